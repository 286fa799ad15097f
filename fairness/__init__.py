"""fairness: finetune text-to-image diffusion models so generated attributes follow a chosen
distribution (distributional alignment loss + adjusted direct finetuning).

The library is pure PyTorch / diffusers / peft / POT and never imports Ray; the Ray layer
lives in the separate ``pipelines`` package.
"""

__version__ = "0.1.0"
