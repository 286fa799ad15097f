"""Is the shipped toy model's concept -> tone association linear in its text encoder?

``python -m research.tone_probe [--ridge 1.0] [--out FILE]`` encodes ``"a photo of <concept>"``
for every concept that leans to one tone, fits a ridge regression from the flattened
last hidden state (every token: the U-Net's cross-attention reads them all) to the lean (+1
light, -1 dark) on the *train* concepts only, and reports how often its sign gives the lean of
the train, val and test concepts; as a control, the same fit on leans shuffled among the
concepts (50 seeded permutations), which must fall to chance off the train concepts.

Why it matters: debiasing has to weaken that association for concepts it never trains on. If
one direction fitted on the train concepts predicts the held-out concepts' leans, a low-rank
adapter can in principle remove it for all of them, and what limits efficacy is the
optimisation (the signal in each step's gradient), not the adapter's reach.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fairness.models.loading import load_pipeline
from fairness.toyworld import world


def encode(pipe, prompt: str) -> np.ndarray:
    tok = pipe.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state[0].flatten().double().numpy()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--out", help="write the result as JSON here too")
    args = ap.parse_args(argv)
    pipe = load_pipeline("toyworld", device="cpu")
    leaning = [c for c in world.concepts() if c.dominant_tone is not None]
    x = np.stack([encode(pipe, world.make_prompt(c, "a photo of {concept}", "")) for c in leaning])
    y = np.array([1.0 if c.dominant_tone == "light" else -1.0 for c in leaning])
    split = np.array([c.split for c in leaning])
    train = split == "train"
    xc = x - x[train].mean(0)
    a = xc[train]  # fewer concepts than features: solve in the concepts' space
    gram = a @ a.T + args.ridge * np.eye(len(a))

    def held_out_accuracy(labels: np.ndarray) -> dict[str, float]:
        w = a.T @ np.linalg.solve(gram, labels[train])
        return {s: float((np.sign(xc[split == s] @ w) == labels[split == s]).mean()) for s in ("train", "val", "test")}

    # Control: the same fit on leans shuffled among the concepts must fall to chance off train.
    rng = np.random.default_rng(0)
    shuffled = [held_out_accuracy(rng.permutation(y)) for _ in range(50)]
    result = {"features": int(x.shape[1]), "ridge": args.ridge,
              "concepts": {s: int((split == s).sum()) for s in ("train", "val", "test")},
              "sign_accuracy": held_out_accuracy(y),
              "shuffled_control_mean": {s: float(np.mean([r[s] for r in shuffled])) for s in ("train", "val", "test")}}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
