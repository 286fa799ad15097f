"""The peers of adjusted DFT, run side by side with it (no Ray here).

Fair Diffusion (:mod:`~fairness.baselines.fair_diffusion`), distribution guidance
(:mod:`~fairness.baselines.distribution_guidance`), ethical intervention, the original model and
ours (:mod:`~fairness.baselines.methods`), and the comparison that audits them all on the same
prompts, noise and evaluation classifier (:mod:`~fairness.baselines.compare`).

Nothing is imported here: the CLI imports :class:`~fairness.baselines.texts.BaselineError` on
every command, and the methods pull in diffusers' semantic pipeline, which costs seconds.
"""
