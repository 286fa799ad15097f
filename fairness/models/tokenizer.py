"""A real ``CLIPTokenizer`` over a small, closed vocabulary.

Stable Diffusion's tokenizer is byte-level BPE over 49k tokens; a world with a few hundred
words needs the same class with a vocabulary of its own. Every word becomes one token (a chain
of BPE merges builds it from characters) and any other word still tokenizes, character by
character, so nothing a user types is rejected.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that assemble ``word</w>`` from its characters."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def build_clip_tokenizer(words: list[str], save_dir: str | Path, model_max_length: int = 24) -> CLIPTokenizer:
    """Write ``vocab.json`` / ``merges.txt`` for ``words`` into ``save_dir`` and load them.

    ``words`` are lower-case tokens (punctuation is split off by CLIP's pre-tokenizer).
    """
    chars = sorted(set(string.ascii_lowercase + string.digits + ",.!?'-_<>"))
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted(set(w.lower() for w in words)):
        if len(word) < 2:
            continue
        for left, right in _word_merges(word):
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
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
