"""Train attribute classifiers (``real.trained_head``) on labelled face images.

The images come from :mod:`fairness.perception.labelled_data` (FairFace / CelebA layouts and
the seed-independent halves that keep the training and evaluation classifiers apart).
:func:`train_classifier` writes a bundle component: ``classifier.safetensors``,
``component.json`` (``{"backend": "real.trained_head", "config": ..., "weights": ...}``, to
paste into ``bundle.json``) and ``metrics.json``; :func:`insert_into_bundle` puts it into an
existing bundle as its ``train_classifier`` or ``eval_classifier``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from fairness.perception.labelled_data import ImageSet, LabelledImages, select_half, train_val_split

ROLES = ("train_classifier", "eval_classifier")


@dataclass
class ClassifierTrainConfig:
    """How to train. ``backbone_spec`` is the encoder component for ``backbone="open_clip"``;
    its relative paths are read from ``backbone_root`` (the bundle the classifier goes into),
    else from the current folder, and then its ``weights`` path is written absolute."""

    backbone: str = "mobilenet_v3_large"
    backbone_spec: dict[str, Any] | None = None
    backbone_root: str | None = None
    imagenet_init: bool | str = False
    image_size: int | None = None  # None: 224 for MobileNet, the encoder's own size for a frozen encoder
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.1
    seed: int = 0
    half: str = "all"
    flip: bool = True
    workers: int = 0
    device: str = "auto"
    bn_batches: int = 100  # batches to re-estimate BatchNorm statistics after training


def _absolute_weights(spec: dict[str, Any]) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    if spec.get("weights"):
        spec["weights"] = str(Path(spec["weights"]).expanduser().resolve())
    return spec


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _loss(logits: dict[str, torch.Tensor], y: torch.Tensor, attrs: list[str]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[a], y[:, j]) for j, a in enumerate(attrs))


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, loader, device: torch.device, max_batches: int) -> bool:
    """Re-estimate BatchNorm running statistics with the final weights (precise BN).

    torchvision's MobileNetV3 updates them with momentum 0.01, so after a short fine-tuning
    they still describe earlier weights and evaluation-mode predictions suffer.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or max_batches <= 0:
        return False
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= max_batches:
            break
        model(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return True


def evaluate(logits: dict[str, torch.Tensor], labels: torch.Tensor, classes: Mapping[str, list[str]]) -> dict[str, Any]:
    """Per attribute: accuracy, per-class recall and the confusion matrix (rows = truth)."""
    out = {}
    for j, (attr, cls) in enumerate(classes.items()):
        pred, true = logits[attr].argmax(-1).cpu().numpy(), labels[:, j].cpu().numpy()
        conf = np.zeros((len(cls), len(cls)), dtype=np.int64)
        np.add.at(conf, (true, pred), 1)
        support = conf.sum(1)
        out[attr] = {
            "accuracy": float((pred == true).mean()) if len(true) else float("nan"),
            "recall": {c: (float(conf[k, k] / support[k]) if support[k] else None) for k, c in enumerate(cls)},
            "support": {c: int(support[k]) for k, c in enumerate(cls)},
            "confusion": conf.tolist(),
        }
    return out


@torch.no_grad()
def _predict(model: nn.Module, loader, device: torch.device, features_only: bool = False):
    outs: list[Any] = []
    ys = []
    for x, y in loader:
        x = x.to(device)
        outs.append(model.features(x).float().cpu() if features_only else {k: v.float().cpu() for k, v in model(x).items()})
        ys.append(y)
    y = torch.cat(ys) if ys else torch.zeros(0, 0, dtype=torch.long)
    if features_only:
        return (torch.cat(outs) if outs else torch.zeros(0)), y
    return {k: torch.cat([o[k] for o in outs]) for k in (outs[0] if outs else {})}, y


def train_classifier(data: LabelledImages, cfg: ClassifierTrainConfig, out_dir: str | Path,
                     val_data: LabelledImages | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a ``real.trained_head`` classifier and write it as a bundle component.

    Returns the metrics written to ``metrics.json`` (``val_accuracy`` per attribute,
    ``component`` = the spec, ``files``). With ``val_data`` the validation set is that data
    (whole), else a seeded ``val_fraction`` of the chosen half.
    """
    from fairness.perception.heads import TrainedHeadClassifier

    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0 (got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")
    if val_data is not None and val_data.classes != data.classes:
        raise ValueError(f"validation classes {val_data.classes} differ from the training data's {data.classes}")
    out = Path(out_dir)
    part = data.subset(select_half(data.keys, cfg.half))
    if len(part) == 0:
        raise ValueError(f"{data.source}: the {cfg.half} half is empty ({len(data)} images in all)")
    if val_data is None:
        tr_idx, va_idx = train_val_split(part.keys, cfg.val_fraction, cfg.seed)
        train_set, val_set = part.subset(tr_idx), part.subset(va_idx)
    else:
        train_set, val_set = part, val_data
    if len(train_set) < 2:
        raise ValueError(f"{data.source}: {len(train_set)} training image(s) left after the half and validation split")
    attrs = list(data.classes)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    config: dict[str, Any] = {"attributes": data.classes, "backbone": cfg.backbone}
    if cfg.backbone == "open_clip":
        if not cfg.backbone_spec:
            raise ValueError("backbone open_clip needs a backbone spec (--backbone-spec), e.g. "
                             '{"backend": "real.open_clip", "config": {...}}')
        config["backbone_spec"] = dict(cfg.backbone_spec) if cfg.backbone_root else _absolute_weights(cfg.backbone_spec)
    model = TrainedHeadClassifier(**config, input_size=cfg.image_size, imagenet_init=cfg.imagenet_init,
                                  root=cfg.backbone_root).to(device)
    config["input_size"] = size = model.input_size
    frozen = model.encoder is not None
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, len(train_set))

    def loader(ds: LabelledImages, train: bool, flip: bool = False):
        return torch.utils.data.DataLoader(
            ImageSet(ds, size, flip=flip), batch_size=bs, shuffle=train, generator=gen if train else None,
            drop_last=train and len(ds) > bs, num_workers=cfg.workers, pin_memory=device.type == "cuda")

    opt = torch.optim.AdamW(list(model.trainable_parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    if frozen:
        # A linear probe: the encoder is frozen, so embed every image once and train on the features.
        feats, ys = _predict(model, tqdm(loader(train_set, False), desc="embed", disable=not progress), device, True)
        feats, ys = feats.to(device), ys.to(device)
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(len(feats), generator=gen).to(device)
            total = 0.0
            batches = range(0, len(feats), bs)
            for start in tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False):
                idx = perm[start:start + bs]
                z = model.dropout(feats[idx])
                loss = _loss({a: h(z) for a, h in model.heads.items()}, ys[idx], attrs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            history.append({"epoch": epoch + 1, "train_loss": total / len(feats)})
    else:
        train_loader = loader(train_set, True, cfg.flip)
        for epoch in range(cfg.epochs):
            model.train()
            total, seen = 0.0, 0
            for x, y in tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False):
                x, y = x.to(device), y.to(device)
                loss = _loss(model(x), y, attrs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + loss.item() * len(y), seen + len(y)
            history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1)})
        _recalibrate_batchnorm(model, loader(train_set, True), device, cfg.bn_batches)
    model.eval()
    val = None
    if len(val_set):
        logits, y = _predict(model, tqdm(loader(val_set, False), desc="validate", disable=not progress), device)
        val = evaluate(logits, y, data.classes)

    out.mkdir(parents=True, exist_ok=True)
    weights = out / "classifier.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    spec = {"backend": "real.trained_head", "config": config, "weights": weights.name}
    (out / "component.json").write_text(json.dumps(spec, indent=2))
    metrics = {
        "val_accuracy": {a: v["accuracy"] for a, v in val.items()} if val else None,
        "validation": val,
        "history": history,
        "component": spec,
        "files": {"weights": str(weights), "component": str(out / "component.json"), "metrics": str(out / "metrics.json")},
        "data": {"source": data.source, "columns": data.columns, "label_maps": data.label_maps, "half": cfg.half,
                 "train_images": len(train_set), "val_images": len(val_set),
                 "val_source": val_data.source if val_data is not None else f"{cfg.val_fraction:g} of the {cfg.half} half",
                 "train_class_counts": train_set.class_counts()},
        "init": "frozen encoder" if frozen else ("imagenet" if cfg.imagenet_init else "random"),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "backbone_spec"},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def insert_into_bundle(bundle_dir: str | Path, role: str, component_dir: str | Path) -> dict[str, Any]:
    """Copy a trained component into ``bundle_dir`` and make it the bundle's ``role``.

    The weights land beside ``bundle.json`` as ``<role>.safetensors`` (another name if a
    different component uses that one); returns the spec written.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    root, src = Path(bundle_dir), Path(component_dir)
    manifest = root / "bundle.json"
    if not manifest.exists():
        raise FileNotFoundError(f"no perception bundle at {root} (missing bundle.json)")
    spec = json.loads((src / "component.json").read_text())
    bundle = json.loads(manifest.read_text())
    comps = bundle.setdefault("components", {})

    def used(c: Any) -> set[str]:
        if isinstance(c, dict) and "backend" in c:
            return {c["weights"]} if c.get("weights") else set()
        return set().union(*(used(v) for v in c.values())) if isinstance(c, dict) else set()

    taken = used({k: v for k, v in comps.items() if k != role})
    name, n = f"{role}.safetensors", 1
    while name in taken:
        name, n = f"{role}-{n}.safetensors", n + 1
    shutil.copyfile(src / spec["weights"], root / name)
    spec = {**spec, "weights": name}
    comps[role] = spec
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(bundle, indent=2))
    tmp.replace(manifest)
    return spec
