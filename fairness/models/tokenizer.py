"""A real ``CLIPTokenizer`` over a small, closed vocabulary.

Stable Diffusion's tokenizer is byte-level BPE over 49k tokens; a world with a few hundred
words needs the same class with a vocabulary of its own. Every word becomes one token (BPE merges
learned on the word list build it from characters) and any other word still tokenizes, character by
character, so nothing a user types is rejected.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` until each word is a single token.

    This is BPE training proper (most frequent adjacent pair first, ties broken
    lexicographically for determinism), so applying the merges by rank, as the tokenizer does,
    rebuilds every word whole; hand-made per-word merge chains would interfere across words.
    """
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words)) if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(best)
        merged = []
        for seq in seqs:
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged.append(tuple(out))
        seqs = [s for s in merged if len(s) > 1]


def build_clip_tokenizer(words: list[str], save_dir: str | Path, model_max_length: int = 24) -> CLIPTokenizer:
    """Write ``vocab.json`` / ``merges.txt`` for ``words`` into ``save_dir`` and load them.

    ``words`` are lower-case tokens (punctuation is split off by CLIP's pre-tokenizer).
    """
    chars = sorted(set(string.ascii_lowercase + string.digits + ",.!?'-_<>"))
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = learn_merges([w.lower() for w in words])
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for tok in SPECIAL:
        vocab.setdefault(tok, len(vocab))
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(str(out))
    return CLIPTokenizer.from_pretrained(str(out))
