"""The ``fairness`` command line.

Library commands (no Ray): ``job``, ``debias``, ``audit``, ``generate``, ``export``,
``toyworld build``, ``perception init``, ``classifier train``, ``bank faces``,
``compare``, ``baseline train-adp``. Ray commands (``bank``, ``tune``,
``serve``, ``debias --workers N``) import the ``pipelines`` package only when called.
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

    # Cheapest first: the prompt file and the bundle fail before the pipeline loads.
    prompts = read_corpus(args.prompts).prompts
    bundle = load_perception(args.perception)
    model = load_model(args.model, args.adapter, args.dtype, args.device)
    bundle = bundle.to(model.pipe.device)
    allow_train = args.classifier == "train"  # asking for it is what allows it (see audit's rule)
    if allow_train:
        specs = dict(bundle.component_specs)
        if "train_classifier" in specs:
            specs["eval_classifier"] = specs["train_classifier"]
        bundle = dataclasses.replace(bundle, eval_classifier=bundle.train_classifier, component_specs=specs)
    sampling = _sampling(args)

    def gen(p, noise):
        return model.generate(p, noise.to(model.pipe.device), sampling)

    def orig(p, noise):
        return model.generate(p, noise.to(model.pipe.device), sampling, original=True)

    joints = args.joint or None
    after = audit(gen, bundle, prompts, args.images_per_prompt, args.seed, model.latent_shape,
                  originals=orig if args.adapter else None, joints=joints, progress=not args.quiet,
                  allow_train_classifier=allow_train)
    result = {"audit": after}
    if args.adapter:
        before = audit(orig, bundle, prompts, args.images_per_prompt, args.seed, model.latent_shape,
                       joints=joints, progress=not args.quiet, allow_train_classifier=allow_train)
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


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from fairness.perception.classifier_training import ClassifierTrainConfig, insert_into_bundle, train_classifier
    from fairness.perception.labelled_data import read_labelled_images

    _set_torch_threads(args)
    if (args.bundle is None) != (args.role is None):
        raise SystemExit("--bundle and --role go together")
    if args.bundle and not (Path(args.bundle) / "bundle.json").exists():
        raise FileNotFoundError(f"no perception bundle at {args.bundle} (missing bundle.json)")
    spec = None
    if args.backbone_spec:
        text = args.backbone_spec
        spec = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    data = read_labelled_images(args.data, args.attributes, args.label_map, args.file_column, args.images_dir)
    val = (read_labelled_images(args.val_data, args.attributes, args.label_map, args.file_column, args.val_images_dir)
           if args.val_data else None)
    cfg = ClassifierTrainConfig(
        backbone=args.backbone, backbone_spec=spec, backbone_root=args.bundle,
        imagenet_init=args.imagenet_weights or args.imagenet_init, image_size=args.image_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, val_fraction=args.val_fraction,
        seed=args.seed, half=args.half, flip=not args.no_flip, workers=args.workers, device=args.device,
    )
    metrics = train_classifier(data, cfg, args.out, val_data=val, progress=not args.quiet)
    out = {"val_accuracy": metrics["val_accuracy"], "train_images": metrics["data"]["train_images"],
           "val_images": metrics["data"]["val_images"], **metrics["files"], "component": metrics["component"]}
    if args.bundle:
        out["bundle"] = {"dir": args.bundle, "role": args.role,
                         "spec": insert_into_bundle(args.bundle, args.role, args.out)}
    print(json.dumps(out, indent=2))
    return 0


def cmd_bank_faces(args: argparse.Namespace) -> int:
    from fairness.models.loading import load_perception, resolve_device
    from fairness.perception.face_bank import build_face_bank

    _set_torch_threads(args)
    # The bank this command writes may be the one bundle.json names, not there yet.
    bundle = load_perception(args.perception, face_bank=False).to(resolve_device(args.device))
    report = build_face_bank(args.images, bundle, args.out, batch_size=args.batch_size, max_side=args.max_side,
                             progress=not args.quiet)
    print(json.dumps(report.to_json(), indent=2))
    print(f"{report.faces} of {report.images} images had a face; bank {tuple((report.faces, report.dim))} "
          f"written to {report.path} (set \"face_bank\" in bundle.json to use it)", file=sys.stderr)
    return 0


def cmd_perception_init(args: argparse.Namespace) -> int:
    from fairness.perception.presets import write_preset

    out = write_preset(args.preset, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {out / 'bundle.json'}: edit its weight paths (see {out / 'README_BUNDLE.md'} where written), "
          f"then build the face bank with `fairness bank faces --perception {out} ...`")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fairness.baselines.compare import load_compare_config, run_compare, write_compare
    from fairness.report.compare import tables_text

    _set_torch_threads(args)
    cfg = load_compare_config(args.config, _parse_overrides(args.set))
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    result = run_compare(cfg, progress=not args.quiet)
    paths = write_compare(result, out)
    print(tables_text(result))
    print(f"\nresults: {paths['json']}\nreport: {paths['html']}")
    return 0


def cmd_baseline_train_adp(args: argparse.Namespace) -> int:
    from fairness.baselines.distribution_guidance import ADPTrainConfig, train_adp
    from fairness.data.prompts import read_corpus
    from fairness.generation import load_model, sampling_defaults
    from fairness.models.loading import load_perception

    _set_torch_threads(args)
    if args.prompts.startswith("toyworld:"):
        from fairness.toyworld import world

        prompts = world.prompts(args.prompts.removeprefix("toyworld:"))
    else:
        prompts = read_corpus(args.prompts).prompts
    bundle = load_perception(args.perception)
    model = load_model(args.model, None, args.dtype, args.device)
    defaults = sampling_defaults(args.model)
    cfg = ADPTrainConfig(images_per_prompt=args.images_per_prompt,
                         num_steps=args.steps or int(defaults["num_inference_steps"]),
                         guidance_scale=float(defaults["guidance_scale"]) if args.guidance is None else args.guidance,
                         epochs=args.epochs, lr=args.lr, seed=args.seed)
    attributes = args.attributes.split(",") if args.attributes else None
    manifest = train_adp(model.pipe, bundle.to(model.pipe.device), prompts, args.out, cfg, attributes,
                         progress=not args.quiet)
    m = manifest["metrics"]
    print(json.dumps({"out": args.out, "images": manifest["images"], "train_seconds": round(manifest["train_seconds"], 1),
                      "val_images": m["val_images"], "val_accuracy_last": m["val_accuracy_last"],
                      "val_accuracy_mean": m["val_accuracy_mean"], "majority_rate": m["majority_rate"]}, indent=2))
    return 0


def bank_faces_parser() -> argparse.ArgumentParser:
    """``fairness bank faces``: parsed apart from ``fairness bank`` (the Ray originals bank)."""
    p = argparse.ArgumentParser(prog="fairness bank faces",
                                description="build a bank of real-face embeddings (face_bank of a perception bundle)")
    p.add_argument("--images", required=True, help="folder of face photos (searched recursively)")
    p.add_argument("--out", required=True, help="bank file to write (.safetensors, {'bank': (M, D)})")
    p.add_argument("--perception", required=True, help="perception bundle folder (its detector and face_embedder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-side", type=int, default=1024, help="shrink larger images to this side first")
    p.add_argument("--device", default="auto")
    _add_threads_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bank_faces, command="bank faces")
    return p


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
                            skip_perception=args.skip_perception, recipe_overrides=parse_overrides(args.recipe),
                            init_from=Path(args.init_from) if args.init_from else None)
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
    _add_set_arg(p, "train.iterations=10")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_set_arg(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {example} (repeatable; a number indexes a list)")


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
    p.add_argument("--init-from", default=None,
                   help="start the SD model from this saved toy pipeline (keeps its VAE; trains text encoder + U-Net)")
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

    pc = sub.add_parser("perception", help="perception bundles").add_subparsers(dest="perception_command", required=True)
    p = pc.add_parser("init", help="write an editable bundle.json for a preset setup")
    p.add_argument("--preset", required=True, help="sd15-paper (the paper's setup) or tiny-real (tiny random encoders, real MTCNN)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle.json")
    p.set_defaults(func=cmd_perception_init)

    cl = sub.add_parser("classifier", help="train attribute classifiers for a perception bundle").add_subparsers(
        dest="classifier_command", required=True)
    p = cl.add_parser("train", help="train a backbone + linear-heads classifier (real.trained_head) on labelled faces")
    p.add_argument("--data", required=True, help="CSV (FairFace: file,age,gender,race; CelebA: image_id,Male,Young,...) "
                                                 "or a folder holding one, or per-class subfolders")
    p.add_argument("--attributes", required=True,
                   help="attributes to learn, e.g. gender,race,age; name=column to read another column (gender=Male)")
    p.add_argument("--label-map", default=None,
                   help="label maps, e.g. race=race4,age=age2 (built in: race4, age2, gender, celeba_young; gender "
                        "defaults to gender; 'none' keeps raw labels)")
    p.add_argument("--backbone", choices=["mobilenet_v3_large", "open_clip"], default="mobilenet_v3_large",
                   help="fine-tuned MobileNetV3-Large, or a frozen image encoder with linear heads")
    p.add_argument("--backbone-spec", default=None,
                   help="the frozen encoder as a bundle component spec (JSON text or file), e.g. "
                        '\'{"backend": "real.open_clip", "config": {...}}\'; with --bundle its relative paths are '
                        'read from the bundle folder')
    p.add_argument("--imagenet-init", action="store_true",
                   help="start MobileNet from ImageNet weights (torch hub cache, else downloaded)")
    p.add_argument("--imagenet-weights", default=None, help="path of the ImageNet MobileNetV3-Large .pth to start from")
    p.add_argument("--out", required=True, help="output folder: classifier.safetensors, component.json, metrics.json")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--val-fraction", type=float, default=0.1, help="seeded share of the data held out to validate")
    p.add_argument("--val-data", default=None, help="validate on this labelled set instead (e.g. FairFace's val CSV)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--half", choices=["all", "first", "second"], default="all",
                   help="train on a fixed, seed-independent half of the data (training vs evaluation classifier)")
    p.add_argument("--image-size", type=int, default=None,
                   help="classifier input side, the face crop size (default: 224; a frozen encoder's own size)")
    p.add_argument("--file-column", default=None, help="column with image paths (default: file, image_id, path, ...)")
    p.add_argument("--images-dir", default=None, help="folder the image paths are relative to (default: the CSV's)")
    p.add_argument("--val-images-dir", default=None, help="the same for --val-data")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips while training")
    p.add_argument("--workers", type=int, default=0, help="image-loading processes (use 4-8 on a GPU machine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bundle", default=None, help="also put the classifier into this bundle folder's bundle.json ...")
    p.add_argument("--role", choices=["train_classifier", "eval_classifier"], default=None, help="... as this role")
    _add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_classifier_train)

    p = sub.add_parser("compare", help="run the peers (Fair Diffusion, distribution guidance, ...) and ours "
                                       "side by side: tables + HTML")
    p.add_argument("--config", required=True, help="compare YAML (see pipelines/configs/toyworld/compare.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
    _add_set_arg(p, "seed=1 --set methods.2.adp=runs/adp-tone-s1")
    _add_threads_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    bl = sub.add_parser("baseline", help="what the peers need before they run").add_subparsers(
        dest="baseline_command", required=True)
    p = bl.add_parser("train-adp", help="train distribution guidance's attribute distribution predictor")
    _add_model_args(p)
    p.add_argument("--perception", default="toyworld", help="bundle whose training classifier gives the pseudo-labels")
    p.add_argument("--prompts", required=True, help="prompt file, or toyworld:SPLIT (e.g. toyworld:train)")
    p.add_argument("--attributes", default=None, help="comma-separated attributes (default: all the classifier's)")
    p.add_argument("--images-per-prompt", type=int, default=8)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="ADP folder (adp.json + adp.safetensors)")
    _add_threads_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_baseline_train_adp)

    for name, help_text in (
        ("bank", "build an originals bank with Ray Data; `fairness bank faces`: a real-face embedding bank"),
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
    if argv[:2] == ["bank", "faces"]:  # a library command beside the Ray `bank`
        args = bank_faces_parser().parse_args(argv[2:])
    elif argv and argv[0] in RAY_COMMANDS:
        # Ray commands parse their own options (argparse.REMAINDER would not pass "--x" on).
        return _ray_command(RAY_COMMANDS[argv[0]], argv[0])(argparse.Namespace(args=argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    from fairness.baselines.texts import BaselineError
    from fairness.config import ConfigError
    from fairness.targets.distributions import TargetError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, TargetError, BaselineError, FileNotFoundError, FileExistsError, KeyError, ValueError) as exc:
        print(f"fairness {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Training faults (docs/bad-inputs.md): a signal stops with 128 + its number after a
        # checkpoint; a failed checkpoint write or a diverged loss is an error (2).
        from fairness.training.loop import NonFiniteLossError, TrainingInterrupted
        from fairness.training.rundir import CheckpointError

        if isinstance(exc, TrainingInterrupted):
            print(f"fairness {args.command}: {exc}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, (CheckpointError, NonFiniteLossError)):
            print(f"fairness {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
