"""One comparison table over several seeds: the README's table of the peers.

``python -m fairness.report.compare_seeds runs/compare-s0 runs/compare-s1 [--out FILE]`` reads
each folder's ``compare.json`` (written by ``fairness compare`` with the same methods and laws
and another ``seed``) and prints, per prompt set, one row per (law, method): the mean over seeds
of the bias of every targeted attribute, its gap to the law, shape accuracy, CLIP-I, objects
found, inference seconds per image and one-time training seconds, with each seed's value in
brackets. One seed's table
cannot tell a method's effect from its noise; the spread between seeds shows it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fairness.report.html import format_cell


class SeedsMismatch(ValueError):
    """The compare folders did not run the same methods, laws and prompt sets."""


def _mean(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("mean")
    return None if value is None else float(value)


def _rows(compare: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, float | None]]:
    """(prompt set, law, method) -> the table's quantities of one compare run."""
    out = {}
    for run in compare["runs"]:
        s = run["audit"]["summary"]
        values: dict[str, float | None] = {}
        for attr in run["target_gap"]:
            values[f"bias {attr}"] = _mean(s["bias"].get(attr))
            values[f"gap {attr}"] = _mean(run["target_gap"][attr])
        for metric in ("accuracy_shape", "clip_i"):
            values[metric] = _mean(s["semantics"].get(metric))
        values["objects found"] = _mean(s["faces"])
        values["s/image"] = _mean(run["seconds_per_image"])
        values["training s"] = _mean(run["training_seconds"])
        out[(run["prompt_set"], run["law"], run["method"])] = values
    return out


def seeds_table(folders: list[Path]) -> str:
    """Markdown: one table per prompt set, mean over the folders' seeds ``(seed values)``."""
    runs = [json.loads((Path(f) / "compare.json").read_text()) for f in folders]
    tables = [_rows(r) for r in runs]
    seeds = [r["config"].get("seed") for r in runs]
    keys = list(tables[0])
    for folder, table in zip(folders[1:], tables[1:]):
        if set(table) != set(keys):
            raise SeedsMismatch(f"{folder}: its (prompt set, law, method) rows differ from {folders[0]}'s: "
                                f"{sorted(set(table) ^ set(keys))}")
    if len(set(seeds)) < len(seeds):
        raise SeedsMismatch(f"the folders share a seed ({seeds}): they measure the same noise twice")
    out = []
    for prompt_set in dict.fromkeys(k[0] for k in keys):
        rows = [k for k in keys if k[0] == prompt_set]
        columns = list(dict.fromkeys(c for k in rows for c in tables[0][k]))
        lines = [f"**{prompt_set}** (seeds {', '.join(map(str, seeds))}: mean (each seed))", "",
                 "| law | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for key in rows:
            cells = []
            for c in columns:
                values = [t[key].get(c) for t in tables]
                if any(v is None or v != v for v in values):
                    cells.append("-")
                    continue
                per_seed = " / ".join(format_cell(v) for v in values)
                cells.append(f"{format_cell(float(np.mean(values)))} ({per_seed})")
            lines.append(f"| {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one comparison table over several seeds' `fairness compare` folders")
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    text = seeds_table(args.folders)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
