"""The toy world's CLIP: a conv image tower and a ``CLIPTextModel`` text tower, and the BPE
tables that rebuild its tokenizer from ``bundle.json``."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fairness.models.tokenizer import build_clip_tokenizer
from fairness.perception.base import TextImageEncoder
from fairness.toyworld.perception.encoder import ToyEncoder

TEXT_MAX_LENGTH = 20  # the longest world prompt is 15 tokens (one per word and comma)


def tokenizer_config(words: list[str]) -> dict[str, Any]:
    """The BPE tables of a CLIP tokenizer over ``words``, small enough to keep in bundle.json.

    Storing the tables (not the word list) pins the exact token ids the text tower was trained
    with, even if the project's tokenizer builder changes later.
    """
    with tempfile.TemporaryDirectory(prefix="toyclip-tok-") as tmp:
        build_clip_tokenizer(words, tmp, model_max_length=TEXT_MAX_LENGTH)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        lines = (Path(tmp) / "merges.txt").read_text().splitlines()[1:]
    return {"vocab": vocab, "merges": [line.split() for line in lines if line]}


class ToyCLIP(TextImageEncoder):
    """A small CLIP: conv image tower and ``CLIPTextModel`` text tower in one embedding space.

    ``vocab`` / ``merges`` (see :func:`tokenizer_config`) rebuild the exact tokenizer it was
    trained with, so the bundle needs no tokenizer files; raw prompts go in ``encode_text``.
    """

    def __init__(self, vocab: dict[str, int], merges: list[list[str]], name: str = "clip", variant: str = "a",
                 width: int = 16, dim: int = 32, text_hidden: int = 32, text_layers: int = 2) -> None:
        super().__init__()
        self.name = name
        self.tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges],
                                       model_max_length=TEXT_MAX_LENGTH, pad_token="<|endoftext|>")
        tok = self.tokenizer
        self.text_model = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
        self.text_proj = nn.Linear(text_hidden, dim, bias=False)
        self.image_tower = ToyEncoder(name=name, variant=variant, width=width, dim=dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=TEXT_MAX_LENGTH,
                              truncation=True, return_tensors="pt").input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=ids.to(self.text_proj.weight.device)).pooler_output
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.token_ids(prompts))
