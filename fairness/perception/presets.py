"""Perception presets: write an editable ``bundle.json`` of real backends in one call.

``sd15-paper`` is the paper's setup for Stable Diffusion v1.5 (MTCNN faces; zero-shot CLIP
classifiers for gender, race4 and age, ViT-H/14 to train and ViT-bigG/14 to evaluate, so the
two are independent networks; CLIP + DINOv2-B for L_img, CLIP-bigG + DINOv2-g for the metrics).
Its weights are not here: the folder's ``README_BUNDLE.md`` says what to download and where.

``tiny-real`` writes the same layout with tiny random-weight CLIPs and DINOs, saved into the
bundle folder as local files, plus the real MTCNN, so the whole real-backend path (weights
resolution included) runs offline in tests.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

from fairness.perception.real.dino import EVAL_DINO, TRAIN_DINO
from fairness.perception.real.openclip import (
    EVAL_CLIP_MODEL,
    EVAL_CLIP_PRETRAINED,
    TRAIN_CLIP_MODEL,
    TRAIN_CLIP_PRETRAINED,
)

# The official code's race4 classes, in its order (0 WMELH = White, Middle Eastern, Latino Hispanic).
RACE4 = ("WMELH", "Black", "Indian", "Asian")

# Zero-shot prompts per class (several per class are averaged); edit them in bundle.json.
PAPER_PROMPTS: dict[str, dict[str, list[str]]] = {
    "gender": {
        "male": ["a photo of a man", "a photo of the face of a man", "a photo of a male person"],
        "female": ["a photo of a woman", "a photo of the face of a woman", "a photo of a female person"],
    },
    "race": {
        "WMELH": ["a photo of a white person", "a photo of a middle eastern person",
                  "a photo of a latino hispanic person"],
        "Black": ["a photo of a black person", "a photo of an african person"],
        "Indian": ["a photo of an indian person", "a photo of a south asian person"],
        "Asian": ["a photo of an east asian person", "a photo of a southeast asian person"],
    },
    "age": {
        "young": ["a photo of a young person", "a photo of a young adult"],
        "old": ["a photo of an old person", "a photo of an elderly person"],
    },
}
assert tuple(PAPER_PROMPTS["race"]) == RACE4

FACE_BANK = "face_bank.safetensors"

# Tiny architectures for ``tiny-real`` (open_clip model configs / Dinov2Config kwargs).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_CLIP_EVAL = {**TINY_CLIP, "embed_dim": 24}
# initializer_range 0.1 (DINOv2's 0.02 makes a random tiny network see every image alike).
TINY_DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
             "image_size": 56, "patch_size": 14, "initializer_range": 0.1}
TINY_DINO_SIZE = 56


def _layout(detector: dict[str, Any], train_clip: dict[str, Any], eval_clip: dict[str, Any],
            train_dino: dict[str, Any], eval_dino: dict[str, Any], prompts: dict[str, Any],
            comment: list[str]) -> dict[str, Any]:
    """The bundle.json both presets share: which network plays which role."""
    return {
        "_comment": comment,
        "components": {
            "detector": {"backend": "real.mtcnn", "config": detector},
            "train_classifier": {"backend": "real.zero_shot", "config": {"attributes": prompts, "clip": train_clip}},
            "eval_classifier": {"backend": "real.zero_shot", "config": {"attributes": prompts, "clip": eval_clip}},
            "encoders": {
                "clip": {"backend": "real.open_clip", "config": {"name": "clip", **train_clip}},
                "dino": {"backend": "real.dinov2", "config": {"name": "dino", **train_dino}},
                "clip_eval": {"backend": "real.open_clip", "config": {"name": "clip_eval", **eval_clip}},
                "dino_eval": {"backend": "real.dinov2", "config": {"name": "dino_eval", **eval_dino}},
            },
            "text_image_encoder": {"backend": "real.open_clip", "config": {"name": "clip_eval", **eval_clip}},
            "face_embedder": {"backend": "real.clip_face_embedder", "config": dict(train_clip)},
        },
        "semantic_encoders": ["clip", "dino"],
        "eval_encoders": {"clip_i": "clip_eval", "dino": "dino_eval"},
        "face_bank": FACE_BANK,
    }


def _sd15_paper(out: Path, cache_dir: str | None = None, local_files_only: bool = False,
                precision: str = "fp32", min_prob: float = 0.9) -> dict[str, Any]:
    common: dict[str, Any] = {"precision": precision, "local_files_only": local_files_only}
    if cache_dir:
        common["cache_dir"] = cache_dir
    train_clip = {"model": TRAIN_CLIP_MODEL, "pretrained": TRAIN_CLIP_PRETRAINED, **common}
    eval_clip = {"model": EVAL_CLIP_MODEL, "pretrained": EVAL_CLIP_PRETRAINED, **common}
    (out / "README_BUNDLE.md").write_text(_SD15_README)
    return _layout(
        detector={"device": "auto", "min_face_size": 20, "thresholds": [0.6, 0.7, 0.7], "min_prob": min_prob},
        train_clip=train_clip, eval_clip=eval_clip,
        train_dino={"source": TRAIN_DINO, **common}, eval_dino={"source": EVAL_DINO, **common},
        prompts=PAPER_PROMPTS,
        comment=["Preset sd15-paper (see README_BUNDLE.md): the weights are not included; download them first.",
                 f"{FACE_BANK} is built later by `fairness bank faces` from real face photos.",
                 "pretrained/source may be a hub id, an open_clip tag, or a local path (relative to this folder)."],
    )


def _tiny_real(out: Path, seed: int = 0) -> dict[str, Any]:
    """Tiny random CLIPs / DINOs saved as local files next to bundle.json, and the real MTCNN."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from fairness.perception.real.dino import load_dinov2
    from fairness.perception.real.openclip import build_open_clip

    for fname, arch, s in (("clip_train.safetensors", TINY_CLIP, seed), ("clip_eval.safetensors", TINY_CLIP_EVAL, seed + 1)):
        state = build_open_clip(arch, s).state_dict()
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / fname))
    for folder, s in (("dino_train", seed), ("dino_eval", seed + 1)):
        load_dinov2(None, TINY_DINO, seed=s).save_pretrained(str(out / folder))
    # A stand-in bank of "real face" embeddings in the face embedder's (the training CLIP's) space.
    gen = torch.Generator().manual_seed(seed)
    save_file({"bank": F.normalize(torch.randn(16, TINY_CLIP["embed_dim"], generator=gen), dim=-1)}, str(out / FACE_BANK))
    dino = {"image_size": TINY_DINO_SIZE}
    return _layout(
        detector={"device": "auto", "min_prob": 0.9},
        train_clip={"model": None, "model_config": TINY_CLIP, "pretrained": "clip_train.safetensors"},
        eval_clip={"model": None, "model_config": TINY_CLIP_EVAL, "pretrained": "clip_eval.safetensors"},
        train_dino={"source": "dino_train", **dino}, eval_dino={"source": "dino_eval", **dino},
        prompts=PAPER_PROMPTS,
        comment=["Preset tiny-real: random-weight tiny CLIP/DINO (for tests), real MTCNN; not for results."],
    )


PRESETS: dict[str, Callable[..., dict[str, Any]]] = {"sd15-paper": _sd15_paper, "tiny-real": _tiny_real}


def write_preset(name: str, out: str | Path, overwrite: bool = False, **options: Any) -> Path:
    """Write preset ``name``'s bundle folder at ``out`` and return it (load it with ``load_bundle``).

    ``options`` are the preset's keyword arguments (sd15-paper: ``cache_dir``, ``local_files_only``,
    ``precision``, ``min_prob``; tiny-real: ``seed``). An existing bundle.json is kept (it may hold
    the user's edits) unless ``overwrite``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown perception preset {name!r}; known: {', '.join(PRESETS)}")
    out = Path(out)
    manifest = out / "bundle.json"
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} exists; pass overwrite=True to replace it")
    accepted = [p for p in inspect.signature(PRESETS[name]).parameters if p != "out"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"preset {name!r} takes no option(s) {unknown}; its options: {accepted}")
    out.mkdir(parents=True, exist_ok=True)
    spec = PRESETS[name](out, **options)
    manifest.write_text(json.dumps(spec, indent=2) + "\n")
    return out


_SD15_README = f"""# Perception bundle: preset sd15-paper

Written by `fairness perception init --preset sd15-paper`. Edit `bundle.json` freely.

| role | backend | weights |
|---|---|---|
| face detector | `real.mtcnn` | inside the facenet-pytorch wheel (nothing to download) |
| training classifier (gender, race4, age) | `real.zero_shot` | open_clip `{TRAIN_CLIP_MODEL}` / `{TRAIN_CLIP_PRETRAINED}` = `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` |
| evaluation classifier, CLIP-T, CLIP-I | `real.zero_shot`, `real.open_clip` | open_clip `{EVAL_CLIP_MODEL}` / `{EVAL_CLIP_PRETRAINED}` = `laion/CLIP-ViT-bigG-14-laion2B-39B-b160k` |
| L_img encoders | `real.open_clip`, `real.dinov2` | the ViT-H-14 above and `{TRAIN_DINO}` |
| DINO metric | `real.dinov2` | `{EVAL_DINO}` |
| face embedder | `real.clip_face_embedder` | the ViT-H-14 above |

The face bank (`{FACE_BANK}`) does not exist yet: once the weights are in place, build it from a
folder of real face photos with
`fairness bank faces --images PHOTOS --perception THIS_FOLDER --out THIS_FOLDER/{FACE_BANK}`.

## Getting the weights (about 16 GB)

On a machine with internet, either fill the Hugging Face cache that the cluster mounts:

    hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K open_clip_model.safetensors
    hf download laion/CLIP-ViT-bigG-14-laion2B-39B-b160k open_clip_model.safetensors
    hf download {TRAIN_DINO} config.json model.safetensors
    hf download {EVAL_DINO} config.json model.safetensors

(then set `HF_HUB_OFFLINE=1` on the cluster), or download into folders (`--local-dir weights/clip-h`, ...)
next to this file and point `pretrained` (CLIP: the `.safetensors` file) and `source` (DINO: the
folder) at them; relative paths resolve against this folder. A missing file fails with a message
naming the exact file and field.

The classes are zero-shot prompts (`attributes` in each classifier's config); race uses the
official code's race4 classes in its order: {", ".join(RACE4)}.
"""
