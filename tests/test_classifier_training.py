"""Label maps, labelled-image reading, `fairness classifier train`, and the audit's classifier rule."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fairness.cli import main
from fairness.metrics.audit import audit, same_classifier
from fairness.perception.bundle import build_component, load_bundle
from fairness.perception.labelled_data import load_image, read_labelled_images, select_half, train_val_split
from fairness.perception.label_maps import LABEL_MAPS, map_label
from fairness.perception.tiny import TinyEncoder, build_tiny_bundle

# FairFace's raw race labels, in several spellings, and their race4 class.
RACES = [("White", "WMELH"), ("Middle Eastern", "WMELH"), ("Latino_Hispanic", "WMELH"), ("Black", "Black"),
         ("Indian", "Indian"), ("East Asian", "Asian"), ("Southeast Asian", "Asian")]
AGES = [("3-9", "young"), ("20-29", "young"), ("30-39", "young"), ("40-49", "old"), ("more than 70", "old")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name, raw, expected", [
    *[("race4", raw, cls) for raw, cls in RACES],
    ("race4", "latino hispanic", "WMELH"), ("race4", "middle_eastern", "WMELH"), ("race4", "EAST_ASIAN", "Asian"),
    ("race4", "South-East Asian", "Asian"), ("race4", " black ", "Black"),
    *[("age2", raw, cls) for raw, cls in AGES],
    ("age2", "0-2", "young"), ("age2", "10-19", "young"), ("age2", "50-59", "old"), ("age2", "60-69", "old"),
    ("age2", "70+", "old"), ("age2", 39, "young"), ("age2", "40", "old"), ("age2", 39.5, "young"), ("age2", "Old", "old"),
    ("gender", "Male", "male"), ("gender", "female", "female"), ("gender", "FEMALE", "female"),
    ("gender", "1", "male"), ("gender", "-1", "female"), ("gender", 1, "male"), ("gender", -1, "female"),
    ("celeba_young", "1", "young"), ("celeba_young", "-1", "old"),
])
def test_label_maps(name, raw, expected):
    assert map_label(name, raw) == expected
    assert expected in LABEL_MAPS[name].classes


def test_label_map_orders_and_errors():
    assert LABEL_MAPS["race4"].classes == ("WMELH", "Black", "Indian", "Asian")  # the official code's order
    assert LABEL_MAPS["age2"].classes == ("young", "old")
    with pytest.raises(ValueError, match=r"'Martian' in row 7, column 'race'"):
        map_label("race4", "Martian", row=7, column="race")
    with pytest.raises(ValueError, match="'elderly'"):
        map_label("age2", "elderly")
    with pytest.raises(ValueError, match="'0'"):
        map_label("gender", "0")  # 0 means male in some datasets and female in others: refuse
    with pytest.raises(KeyError, match="race7"):
        map_label("race7", "White")


def _face(gender: str, old: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """A 'face' whose gender is its colour (red / blue) and whose age is a white bar on top."""
    img = rng.uniform(0.25, 0.45, (size, size, 3))
    img[..., 0 if gender == "male" else 2] += 0.45
    if old:
        img[: size // 3, :, :] = 0.95
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_fairface(root: Path, n: int = 128, size: int = 24, seed: int = 0) -> Path:
    """FairFace layout: ``file,age,gender,race,service_test`` with files under ``train/``."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        gender = ("Male", "Female")[i % 2]
        age = AGES[(i // 2) % len(AGES)][0]
        race = RACES[i % len(RACES)][0]
        name = f"train/{i + 1}.png"
        Image.fromarray(_face(gender.lower(), map_label("age2", age) == "old", size, rng)).save(root / name)
        rows.append({"file": name, "age": age, "gender": gender, "race": race, "service_test": "True"})
    path = root / "fairface_label_train.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def fairface(tmp_path_factory) -> Path:
    return write_fairface(tmp_path_factory.mktemp("fairface"))


def test_reads_fairface_layout(fairface):
    data = read_labelled_images(fairface, "gender,race,age", "race=race4,age=age2")
    assert len(data) == 128 and data.files[0] == fairface.parent / "train" / "1.png"
    assert data.classes == {"gender": ["male", "female"], "race": ["WMELH", "Black", "Indian", "Asian"],
                            "age": ["young", "old"]}
    assert data.rows[0] == 2  # spreadsheet numbering: the header is row 1
    # row i (0-based) has race RACES[i % 7]
    race4 = [data.classes["race"][k] for k in data.labels["race"][:7]]
    assert race4 == [cls for _, cls in RACES]
    assert data.class_counts()["gender"] == {"male": 64, "female": 64}
    # the folder holding the CSV reads the same; raw labels stay raw without a map
    raw = read_labelled_images(fairface.parent, "race", "race=none")
    assert raw.classes["race"] == sorted(r for r, _ in RACES)


def test_reading_errors_name_the_problem(tmp_path, fairface):
    with pytest.raises(KeyError, match="no column 'skin'"):
        read_labelled_images(fairface, "gender,skin")
    bad = tmp_path / "bad.csv"
    text = fairface.read_text().splitlines()
    bad.write_text("\n".join(text[:4] + [text[4].replace("Black", "Martian").replace("White", "Martian")]) + "\n")
    shutil.copytree(fairface.parent / "train", tmp_path / "train")
    with pytest.raises(ValueError, match=r"'Martian' in row 5, column 'race'"):
        read_labelled_images(bad, "race", "race=race4")
    (tmp_path / "train" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 3: .*2\.png"):
        read_labelled_images(bad, "gender")
    empty = tmp_path / "empty.csv"
    empty.write_text("file,gender\n")
    with pytest.raises(ValueError, match="empty set"):
        read_labelled_images(empty, "gender")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="empty set"):
        read_labelled_images(tmp_path / "nothing", "gender")
    assert main(["classifier", "train", "--data", str(empty), "--attributes", "gender", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2


def test_reads_celeba_layout_and_class_folders(tmp_path):
    rng = np.random.default_rng(1)
    imgs = tmp_path / "img_align_celeba"
    imgs.mkdir()
    rows = []
    for i in range(6):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(_face("male", False, 16, rng)).save(imgs / name)
        rows.append(f"{name},{(-1) ** i},{1 if i < 3 else -1},{1 if i % 3 else -1},-1")
    csv_path = tmp_path / "list_attr_celeba.csv"
    csv_path.write_text("image_id,Male,Young,Smiling,Bald\n" + "\n".join(rows) + "\n")
    with pytest.raises(FileNotFoundError, match="images-dir"):
        read_labelled_images(csv_path, "gender")
    data = read_labelled_images(csv_path, "gender,age", images_dir=imgs)
    assert data.columns == {"gender": "Male", "age": "Young"}
    assert data.classes == {"gender": ["male", "female"], "age": ["young", "old"]}
    assert data.labels["gender"].tolist() == [0, 1, 0, 1, 0, 1] and data.labels["age"].tolist() == [0, 0, 0, 1, 1, 1]
    smiling = read_labelled_images(csv_path, "smile=Smiling,gender", images_dir=imgs)
    assert smiling.columns["smile"] == "Smiling"
    with pytest.raises(ValueError, match="single class"):
        read_labelled_images(csv_path, "bald=Bald", images_dir=imgs)
    # per-class subfolders, one attribute, label maps apply to folder names
    for cls in ("Female", "Male"):
        (tmp_path / "folders" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_face(cls.lower(), False, 16, rng)).save(tmp_path / "folders" / cls / f"{i}.png")
    folders = read_labelled_images(tmp_path / "folders", "gender")
    assert folders.classes == {"gender": ["male", "female"]} and folders.labels["gender"].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="one attribute"):
        read_labelled_images(tmp_path / "folders", "gender,age")


def test_halves_are_disjoint_and_splits_deterministic():
    keys = [f"train/{i}.jpg" for i in range(1000)]
    first, second = set(select_half(keys, "first")), set(select_half(keys, "second"))
    assert not first & second and len(first | second) == 1000 and 400 < len(first) < 600
    # a half does not depend on which other images are listed: the same key lands in the same half
    assert set(select_half(keys[:500], "first")) == {i for i in first if i < 500}
    tr, va = train_val_split(keys, 0.2, seed=3)
    assert len(va) == 200 and not set(tr) & set(va) and len(tr) + len(va) == 1000
    tr2, va2 = train_val_split(keys, 0.2, seed=3)
    assert (va == va2).all() and set(train_val_split(keys, 0.2, seed=4)[1]) != set(va)


def _accuracy(clf, data, attr: str) -> float:
    x = torch.stack([load_image(f, clf.input_size) for f in data.files])
    with torch.no_grad():
        pred = clf(x)[attr].argmax(-1).numpy()
    return float((pred == data.labels[attr]).mean())


def test_train_mobilenet_through_the_cli(tmp_path, fairface, capsys):
    out = tmp_path / "clf"
    bundle = build_tiny_bundle(tmp_path / "bundle", {"gender": ["male", "female"], "age": ["young", "old"]})
    assert main(["classifier", "train", "--data", str(fairface), "--attributes", "gender,age", "--label-map", "age=age2",
                 "--backbone", "mobilenet_v3_large", "--out", str(out), "--epochs", "3", "--batch-size", "16",
                 "--image-size", "32", "--val-fraction", "0.25", "--half", "all", "--quiet",
                 "--bundle", str(bundle), "--role", "eval_classifier"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["train_images"] == 96 and metrics["data"]["val_images"] == 32
    assert metrics["val_accuracy"]["gender"] >= 0.9 and metrics["val_accuracy"]["age"] >= 0.9
    assert printed["val_accuracy"] == metrics["val_accuracy"]
    spec = json.loads((out / "component.json").read_text())
    assert spec["backend"] == "real.trained_head" and spec["weights"] == "classifier.safetensors"
    assert spec["config"]["attributes"] == {"gender": ["male", "female"], "age": ["young", "old"]}
    clf = build_component(spec, root=out)  # strict load of the saved weights
    assert clf.input_size == 32 and _accuracy(clf, read_labelled_images(fairface, "gender"), "gender") >= 0.9
    crops = torch.rand(2, 3, 50, 50, requires_grad=True)  # any crop size; differentiable preprocessing
    clf(crops)["gender"].sum().backward()
    assert crops.grad is not None and crops.grad.abs().sum() > 0
    # --bundle put it into the bundle as its evaluation classifier
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["components"]["eval_classifier"]["backend"] == "real.trained_head"
    loaded = load_bundle(bundle)
    assert loaded.eval_classifier.attributes == loaded.train_classifier.attributes and not same_classifier(loaded)


def test_train_frozen_encoder_heads_on_halves(tmp_path, fairface):
    torch.manual_seed(0)
    encoder = TinyEncoder("probe", dim=32)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    backbone = json.dumps({"backend": "tiny.encoder", "config": {"name": "probe", "dim": 32},
                           "weights": str(tmp_path / "encoder.safetensors")})
    outs = {}
    for half in ("first", "second"):
        outs[half] = tmp_path / half
        assert main(["classifier", "train", "--data", str(fairface), "--attributes", "gender",
                     "--backbone", "open_clip", "--backbone-spec", backbone, "--out", str(outs[half]),
                     "--epochs", "30", "--batch-size", "16", "--lr", "1e-2", "--image-size", "16",
                     "--val-fraction", "0.25", "--half", half, "--quiet"]) == 0
    m = {h: json.loads((o / "metrics.json").read_text()) for h, o in outs.items()}
    assert m["first"]["data"]["train_images"] + m["first"]["data"]["val_images"] + \
        m["second"]["data"]["train_images"] + m["second"]["data"]["val_images"] == 128
    for half in outs:
        assert m[half]["val_accuracy"]["gender"] >= 0.9, m[half]["validation"]
        assert m[half]["init"] == "frozen encoder"
    # only the heads are saved; the encoder comes from its own spec, and strict loading works
    saved = load_file(str(outs["first"] / "classifier.safetensors"))
    assert set(saved) == {"heads.gender.weight", "heads.gender.bias"}
    clf = build_component(json.loads((outs["first"] / "component.json").read_text()), root=outs["first"])
    assert set(clf.state_dict()) == set(saved) and all(not p.requires_grad for p in clf.encoder.parameters())
    assert _accuracy(clf, read_labelled_images(fairface, "gender"), "gender") >= 0.9
    clf.to(torch.float64)  # moving the classifier moves its frozen encoder
    assert next(clf.encoder.parameters()).dtype == torch.float64
    assert clf(torch.rand(2, 3, 16, 16, dtype=torch.float64))["gender"].shape == (2, 2)


def test_train_heads_on_a_real_open_clip_encoder(tmp_path, fairface, capsys):
    presets = pytest.importorskip("fairness.perception.presets")
    pytest.importorskip("open_clip")
    spec = {"backend": "real.open_clip",
            "config": {"model": None, "model_config": presets.TINY_CLIP, "pretrained": None, "seed": 0}}
    out = tmp_path / "clip_heads"
    assert main(["classifier", "train", "--data", str(fairface), "--attributes", "gender", "--backbone", "open_clip",
                 "--backbone-spec", json.dumps(spec), "--out", str(out), "--epochs", "30", "--batch-size", "16",
                 "--lr", "1e-2", "--val-fraction", "0.25", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["val_accuracy"]["gender"] >= 0.9
    component = json.loads((out / "component.json").read_text())
    assert component["config"]["input_size"] == presets.TINY_CLIP["vision_cfg"]["image_size"]  # the encoder's size
    assert set(load_file(str(out / "classifier.safetensors"))) == {"heads.gender.weight", "heads.gender.bias"}
    clf = build_component(component, root=out)
    assert _accuracy(clf, read_labelled_images(fairface, "gender"), "gender") >= 0.9


def test_imagenet_init_without_weights_is_a_clear_error(tmp_path):
    from fairness.perception.heads import TrainedHeadClassifier

    with pytest.raises(FileNotFoundError, match="ImageNet weights for mobilenet_v3_large"):
        TrainedHeadClassifier({"gender": ["male", "female"]}, imagenet_init=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="backbone_spec"):
        TrainedHeadClassifier({"gender": ["male", "female"]}, backbone="open_clip")


# --- the audit rule: the evaluation classifier is trained independently -----------------------

ATTRS = {"gender": ["male", "female"], "race": ["a", "b", "c", "d"]}


def _gen(prompts, noise):
    g = torch.Generator().manual_seed(int(noise.abs().sum() * 1000) % 2**31)
    return torch.rand(len(prompts), 3, 16, 16, generator=g)


def _run_audit(bundle, **kw):
    return audit(_gen, bundle, ["a photo of a doctor"], 4, 0, (4, 4, 4), progress=False, **kw)


def test_audit_refuses_the_training_classifier_unless_asked(tmp_path):
    root = build_tiny_bundle(tmp_path / "b", ATTRS)
    distinct = load_bundle(root)
    assert not same_classifier(distinct)
    assert _run_audit(distinct).summary["independent_classifier"] is True

    manifest = json.loads((root / "bundle.json").read_text())
    for variant in ("same file", "same bytes"):
        comps = manifest["components"]
        if variant == "same file":
            comps["eval_classifier"] = dict(comps["train_classifier"])
        else:  # another file with identical weights is the same network
            shutil.copyfile(root / "train_classifier.safetensors", root / "copy.safetensors")
            comps["eval_classifier"] = {**comps["train_classifier"], "weights": "copy.safetensors"}
        (root / "bundle.json").write_text(json.dumps(manifest))
        bundle = load_bundle(root)
        assert same_classifier(bundle)
        with pytest.raises(ValueError, match="--classifier train"):
            _run_audit(bundle)
        result = _run_audit(bundle, allow_train_classifier=True)
        assert result.summary["independent_classifier"] is False and result.rows[0]["images"] == 4
    # a different config (or different weights) is another network
    comps["eval_classifier"] = {**comps["train_classifier"], "config": {"attributes": ATTRS, "input_size": 20}}
    (root / "bundle.json").write_text(json.dumps(manifest))
    assert not same_classifier(load_bundle(root))


def test_shipped_toy_world_classifiers_are_independent():
    from fairness.toyworld import default_perception_dir

    assert not same_classifier(load_bundle(default_perception_dir()))


def test_cli_audit_classifier_train_counts_as_asking(tmp_path, capsys):
    from tests.helpers import PROMPTS, tiny_world

    model, perception = tiny_world(tmp_path)
    manifest = json.loads((perception / "bundle.json").read_text())
    manifest["components"]["eval_classifier"] = manifest["components"]["train_classifier"]
    (perception / "bundle.json").write_text(json.dumps(manifest))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    args = ["audit", "--model", str(model), "--perception", str(perception), "--prompts", str(prompts),
            "--images-per-prompt", "2", "--steps", "2", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    assert "--classifier train" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "asked"), "--classifier", "train"]) == 0
    metrics = json.loads((tmp_path / "asked" / "metrics.json").read_text())
    assert metrics["summary"]["independent_classifier"] is False
