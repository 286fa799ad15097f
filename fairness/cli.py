"""The ``fairness`` command line.

Library commands (no Ray): ``job``, ``debias``, ``audit``, ``generate``, ``export``,
``toyworld build``. Ray commands (``bank``, ``tune``, ``serve``, ``debias --workers N``) import
the ``pipelines`` package only when called.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _load_cfg(args: argparse.Namespace):
    from fairness.config import load_config

    return load_config(args.config, _parse_overrides(args.set))


def _run_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / name


def cmd_job(args: argparse.Namespace) -> int:
    from fairness.job import run_job
    from fairness.report.job_report import paper_table_text

    cfg = _load_cfg(args)
    out = _run_dir(args, cfg.name)
    result = run_job(cfg, out, progress=not args.quiet)
    print(paper_table_text(result.before, result.after))
    print(f"\nrun directory: {out}\nadapter: {result.train.adapter_dir}\nmetrics: {result.metrics_path}")
    if result.report_path:
        print(f"report: {result.report_path}")
    return 0


def cmd_debias(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    out = _run_dir(args, cfg.name)
    if args.workers > 1 or args.gpus_per_worker:
        from pipelines.train import fit_distributed

        result = fit_distributed(cfg, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker, resume=not args.no_resume)
    else:
        from fairness.training.loop import Trainer

        result = Trainer(cfg, out, progress=not args.quiet).fit(resume=not args.no_resume)
    print(json.dumps({"run_dir": str(out), "steps": result.steps, "skipped": result.skipped,
                      "best_step": result.best_step, "adapter": str(result.adapter_dir)}, indent=2))
    return 0


def _sampling(args: argparse.Namespace):
    from fairness.dft.engine import SamplingConfig
    from fairness.generation import sampling_defaults

    d = sampling_defaults(args.model)
    return SamplingConfig(num_steps=args.steps or int(d["num_inference_steps"]),
                          guidance_scale=args.guidance if args.guidance is not None else float(d["guidance_scale"]), mode="none")


def cmd_audit(args: argparse.Namespace) -> int:
    from fairness.data.prompts import read_corpus
    from fairness.generation import load_model
    from fairness.job import write_metrics
    from fairness.metrics.audit import audit
    from fairness.models.loading import load_perception

    model = load_model(args.model, args.adapter, args.dtype, args.device)
    bundle = load_perception(args.perception).to(model.pipe.device)
    if args.classifier == "train":
        bundle = dataclasses.replace(bundle, eval_classifier=bundle.train_classifier)
    prompts = read_corpus(args.prompts).prompts
    sampling = _sampling(args)

    def gen(p, noise):
        return model.generate(p, noise.to(model.pipe.device), sampling)

    def orig(p, noise):
        return model.generate(p, noise.to(model.pipe.device), sampling, original=True)

    joints = args.joint or None
    after = audit(gen, bundle, prompts, args.images_per_prompt, args.seed, model.latent_shape,
                  originals=orig if args.adapter else None, joints=joints, progress=not args.quiet)
    result = {"audit": after}
    if args.adapter:
        before = audit(orig, bundle, prompts, args.images_per_prompt, args.seed, model.latent_shape,
                       joints=joints, progress=not args.quiet)
    else:
        before = after
    write_metrics(Path(args.out), {"audit": before}, result, {"model": args.model, "adapter": args.adapter})
    summary = after.summary
    print(json.dumps({"bias": {k: round(v["mean"], 4) for k, v in summary["bias"].items()},
                      "semantics": {k: round(v["mean"], 4) for k, v in summary["semantics"].items()}}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from fairness.generation import load_model
    from fairness.seeding import image_noise

    model = load_model(args.model, args.adapter, args.dtype, args.device)
    noise = image_noise(args.seed, args.prompt, range(args.n), model.latent_shape)
    images = model.generate([args.prompt] * args.n, noise.to(model.pipe.device), _sampling(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(out / f"{i:03d}.png")
    print(f"wrote {len(images)} images to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fairness.config import DebiasConfig
    from fairness.training.loop import Trainer
    from fairness.training.rundir import RunDir

    run = RunDir(args.run_dir)
    if not run.config_path.exists():
        raise SystemExit(f"{args.run_dir} is not a run directory (no config.yaml)")
    cfg = DebiasConfig.model_validate(yaml.safe_load(run.config_path.read_text()))
    ckpt = run.checkpoint_dir(args.step) if args.step else run.latest_checkpoint()
    if ckpt is None or not (ckpt / "state.pt").exists():
        raise SystemExit(f"no checkpoint {'step ' + str(args.step) if args.step else ''} in {run.checkpoints}")
    trainer = Trainer(cfg, run.root, progress=False)
    trainer.resume(ckpt)
    state = trainer.best_state if args.best and trainer.best_state is not None else trainer.export_state()
    trainer.model.adapter.load_state_dict(state)
    from fairness.adapters.io import export_adapter

    path = export_adapter(trainer.model.adapter, args.out, extra={"run": cfg.name, "step": trainer.step})
    print(f"exported adapter to {path}")
    return 0


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _set_torch_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_toyworld_build(args: argparse.Namespace) -> int:
    from fairness.toyworld.build import build_toyworld
    from fairness.toyworld.diffusion import parse_overrides

    _set_torch_threads(args)
    report = build_toyworld(Path(args.out), seed=args.seed, quick=args.quick, device=args.device,
                            skip_perception=args.skip_perception, recipe_overrides=parse_overrides(args.recipe))
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_toyworld_fidelity(args: argparse.Namespace) -> int:
    from fairness.toyworld.build import remeasure_fidelity

    _set_torch_threads(args)
    report = remeasure_fidelity(Path(args.assets), Path(args.out), images_per_concept=args.images_per_concept,
                                seed=args.seed, device=args.device, progress=not args.quiet)
    print(json.dumps({"summary": report["summary"], "measured": report["measured"]}, indent=2))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toyworld", help="hub id, diffusers folder, or 'toyworld' (default)")
    p.add_argument("--adapter", default=None, help="adapter folder exported by `fairness debias`/`export`")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, else 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, else 7.5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML job config (see pipelines/configs/)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.iterations=10 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("job", help="audit, debias, audit again, write metrics + HTML report")
    _add_config_args(p)
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("debias", help="run the debiasing training loop (resumes from --run-dir)")
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (>1 starts Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray Train worker")
    p.set_defaults(func=cmd_debias)

    p = sub.add_parser("audit", help="measure bias and semantics of a model (+ adapter)")
    _add_model_args(p)
    p.add_argument("--perception", default="toyworld", help="perception bundle folder or 'toyworld'")
    p.add_argument("--prompts", required=True, help="prompt file: .txt, .jsonl, .csv or .parquet")
    p.add_argument("--images-per-prompt", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--joint", action="append", default=[], help="joint attribute to audit, e.g. tone*color")
    p.add_argument("--classifier", choices=["eval", "train"], default="eval",
                   help="measure attributes with the independent evaluation classifier (default) or with the one "
                        "the loss trained against; a large gap between the two means the adapter fooled the "
                        "training classifier rather than changed the attribute")
    p.add_argument("--out", required=True, help="output folder (metrics.json + CSV)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("generate", help="generate images for one prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export an adapter from a run directory's checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--best", action="store_true", help="export the best-validation weights")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    tw = sub.add_parser("toyworld", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    p = tw.add_parser("build", help="train the toy world's diffusion model and perception bundle")
    p.add_argument("--out", default=str(Path(__file__).parent / "toyworld" / "assets"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a handful of steps (tests)")
    p.add_argument("--skip-perception", action="store_true", help="reuse an existing perception bundle")
    p.add_argument("--device", default=None)
    p.add_argument("--recipe", default="{}",
                   help='SD model recipe overrides as JSON, e.g. \'{"unet_steps": 20000}\' (default: the shipped recipe)')
    _add_threads_arg(p)
    p.set_defaults(func=cmd_toyworld_build)
    p = tw.add_parser("fidelity", help="measure a built toy world's fidelity again, without training")
    p.add_argument("--assets", default=str(Path(__file__).parent / "toyworld" / "assets"),
                   help="a built world: the folder holding sd/ and perception/ (default: the shipped one)")
    p.add_argument("--out", required=True, help="report JSON; the build's training figures in it are kept")
    p.add_argument("--images-per-concept", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    _add_threads_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_toyworld_fidelity)

    for name, help_text in (
        ("bank", "build an originals bank with Ray Data"),
        ("tune", "search loss weights / C / lr with Ray Tune"),
        ("serve", "serve the debiased model (OpenAI Images API) with Ray Serve"),
    ):
        # Listed for --help; main() dispatches them before parsing (Ray is imported only then).
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_ray_command(RAY_COMMANDS[name], name))
    return parser


def _ray_command(module: str, name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise SystemExit(f"`fairness {name}` needs the Ray extra: pip install 'fairdiff-ray[ray]' ({exc})") from exc
        return int(mod.main(args.args, prog=f"fairness {name}") or 0)

    return run


RAY_COMMANDS = {"bank": "pipelines.bank", "tune": "pipelines.tune", "serve": "pipelines.serve"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RAY_COMMANDS:
        # Ray commands parse their own options (argparse.REMAINDER would not pass "--x" on).
        return _ray_command(RAY_COMMANDS[argv[0]], argv[0])(argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    from fairness.config import ConfigError
    from fairness.targets.distributions import TargetError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, TargetError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"fairness {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
