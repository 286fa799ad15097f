"""The main job on a tiny world: metrics files and an HTML report holding every figure."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest

from fairness.job import run_job
from tests.helpers import tiny_config


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: dict[str, str] = {}
        self.headings: list[str] = []
        self._in_h = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a["data-name"]] = a["src"]
        self._in_h = tag in ("h1", "h2")

    def handle_data(self, data):
        if self._in_h and data.strip():
            self.headings.append(data.strip())

    def handle_endtag(self, tag):
        self._in_h = False


def test_job_writes_metrics_and_a_complete_report(tmp_path):
    cfg = tiny_config(tmp_path, target={"joint": {"attributes": ["gender", "race"], "probs": "uniform"}})
    result = run_job(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["summary"]["bias"]) >= {"gender", "race", "gender*race"}
    assert set(metrics["summary"]["bias_floor"]) == set(metrics["summary"]["bias"])
    assert metrics["sets"]["test"]["before"]["prompts"][0]["prompt"] == cfg.prompts.test[0].prompts[0]
    assert (tmp_path / "run" / "metrics_test.csv").exists()
    parser = _Images()
    parser.feed(result.report_path.read_text())
    figures = {p.stem for p in (tmp_path / "run" / "figures").glob("*.png")}
    assert figures == set(parser.images)
    assert {"bias_test", "freq_test_gender", "freq_test_race", "grid_test_0", "losses", "faces", "alignment", "validation"} <= figures
    for src in parser.images.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("Group frequencies" in h for h in parser.headings)
    agreement = metrics["summary"]["agreement"]  # the tiny bundle's two classifiers are distinct networks
    assert set(agreement) == {"gender", "race"} and all(0 <= v["mean"] <= 1 for v in agreement.values())
    assert "training vs evaluation classifier" in result.report_path.read_text()
    assert "the stereotype swapped" in result.report_path.read_text()  # the movement table, per prompt set
    from fairness.report.results import markdown_table, movement_table

    movement = movement_table([tmp_path / "run"]).splitlines()
    assert [line.split(" | ")[2] for line in movement[2:]] == ["gender", "race", "gender*race"]
    for line in movement[2:]:  # kept + near + reversed cover every prompt with an object before and after
        assert sum(float(c.strip(" |%")) for c in line.split(" | ")[3:]) == pytest.approx(100, abs=1.5)

    table = markdown_table([tmp_path / "run"]).splitlines()
    assert len(table) == 3 and "gender*race" in table[2] and table[2].startswith("| tiny | test |")
    faces = [result.before["test"].summary["faces"]["mean"], result.after["test"].summary["faces"]["mean"]]
    assert f"| {faces[0]:.0%} → {faces[1]:.0%} |" in table[2]  # the objects-found column
    _check_seeds_table(tmp_path / "run")


def _check_seeds_table(run) -> None:
    """``results --seeds``: one config under two seeds gives the mean and each seed's value;
    runs that share a seed or ran other configs are refused."""
    import shutil

    import yaml

    from fairness.report.results import SeedsMismatch, seeds_table

    other = run.with_name("run_seed1")
    shutil.copytree(run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": cfg["seed"] + 1}))
    metrics = json.loads((other / "metrics.json").read_text())
    after = metrics["sets"]["test"]["after"]["summary"]["bias"]["gender"]
    first = after["mean"]
    after["mean"] = first + 0.1
    (other / "metrics.json").write_text(json.dumps(metrics))
    table = seeds_table([run, other]).splitlines()
    assert len(table) == 3 and table[2].startswith("| test (")
    assert f"→ {first + 0.05:.3f} ({first:.3f}, {first + 0.1:.3f})" in table[2]
    with pytest.raises(SeedsMismatch, match="share a seed"):
        seeds_table([run, run])
    (other / "metrics.json").write_text(json.dumps({**metrics, "config": "another"}))
    with pytest.raises(SeedsMismatch, match="different configs"):
        seeds_table([run, other])


def test_originals_are_drawn_once_within_the_budget() -> None:
    """The after-audit reads the before-audit's originals back (same prompts, same noise) instead
    of sampling again; a different noise samples, and past the byte budget nothing is kept."""
    import torch

    from fairness.job import drawn_once

    calls: list[int] = []

    def generate(prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        calls.append(len(prompts))
        return noise * 2

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = drawn_once(generate)
    first = gen(["a", "a"], noise)
    assert torch.equal(gen(["a", "a"], noise.clone()), first) and calls == [2]
    gen(["a", "a"], noise + 1)
    gen(["b", "b"], noise)
    assert calls == [2, 2, 2]
    tight = drawn_once(generate, budget_bytes=noise.numel() * noise.element_size() - 1)
    tight(["a", "a"], noise)
    tight(["a", "a"], noise)
    assert calls == [2, 2, 2, 2, 2]
