"""Checks on the texts the peers add to a prompt (edit texts, prompt suffixes).

A peer that steers with text only works where the text encoder knows the words. Stable
Diffusion's tokenizer splits an unknown word into sub-word pieces and the toy world's closed
vocabulary splits it into letters, and either way the method runs and silently does nothing
useful. So every word must be one token of the pipeline's tokenizer unless the caller allows
sub-words (a real word SD's BPE happens to split, e.g. a rare occupation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase


class BaselineError(ValueError):
    """A peer that cannot run as configured; the message says what to change."""


def check_words(tokenizer: PreTrainedTokenizerBase, text: str, where: str, allow_subwords: bool = False) -> None:
    """Raise :class:`BaselineError` when ``text`` is empty, too long for the text encoder, or
    (unless ``allow_subwords``) has a word the tokenizer does not hold as one token."""
    words = re.findall(r"[A-Za-z0-9']+", text)
    if not words:
        raise BaselineError(f"{where}: the text {text!r} has no words")
    if not allow_subwords:
        for word in words:
            pieces = tokenizer.tokenize(word)
            if len(pieces) != 1:
                raise BaselineError(
                    f"{where}: {word!r} (in {text!r}) is not a word of the tokenizer's vocabulary: it splits into "
                    f"{pieces}, so the text encoder has no learned meaning for it. Use words the model was trained "
                    "on (the toy world: fairness.toyworld.world.caption_vocabulary()), or set allow_subwords.")
    tokens = len(tokenizer(text, truncation=False, verbose=False).input_ids)
    if tokens > tokenizer.model_max_length:
        raise BaselineError(f"{where}: {text!r} is {tokens} tokens; the text encoder reads {tokenizer.model_max_length}")


def check_class_texts(tokenizer: PreTrainedTokenizerBase, texts: Mapping[str, Sequence[str]],
                      attributes: Mapping[str, Sequence[str]], where: str, allow_subwords: bool = False) -> None:
    """Per attribute, one text per class of the classifier, each :func:`check_words`-clean."""
    if not texts:
        raise BaselineError(f"{where}: give one text per class for at least one attribute")
    for attr, items in texts.items():
        if attr not in attributes:
            raise BaselineError(f"{where}: unknown attribute {attr!r}; the classifier knows {sorted(attributes)}")
        classes = list(attributes[attr])
        if len(items) != len(classes):
            raise BaselineError(f"{where}.{attr}: {len(items)} texts for the {len(classes)} classes {classes}; "
                                "give one text per class, in the classifier's order")
        for cls, text in zip(classes, items):
            check_words(tokenizer, text, f"{where}.{attr} ({cls})", allow_subwords)
