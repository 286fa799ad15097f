"""Attach a trainable adapter to a diffusers SD pipeline.

* ``text_lora`` (the paper's default): LoRA rank 50 on the text encoder's attention and MLP.
* ``unet_lora``: LoRA on the U-Net's attention projections.
* ``both_lora``: both of the above.
* ``soft_tokens``: N new token embeddings prepended to every prompt (textual-inversion style).

LoRA goes through peft's integration in transformers / diffusers (``add_adapter``), so the
adapter can be switched off to get the frozen model's originals and saved with
``save_lora_weights``. ``lora_alpha`` equals the rank by default (scale 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

AdapterKind = Literal["text_lora", "unet_lora", "both_lora", "soft_tokens"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER_NAME = "fairness"


@dataclass
class AdapterSpec:
    kind: AdapterKind = "text_lora"
    rank: int = 50
    alpha: float | None = None
    dropout: float = 0.0
    text_targets: list[str] = field(default_factory=lambda: list(TEXT_LORA_TARGETS))
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    num_tokens: int = 5
    token: str = "<fair>"

    def lora_config(self, targets: list[str]) -> LoraConfig:
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout, target_modules=list(targets), init_lora_weights=True,
        )

    @property
    def on_text(self) -> bool:
        return self.kind in ("text_lora", "both_lora")

    @property
    def on_unet(self) -> bool:
        return self.kind in ("unet_lora", "both_lora")

    def token_names(self) -> list[str]:
        """The tokens diffusers' ``load_textual_inversion`` creates for a multi-vector token."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_tokens)]


class TrainableAdapter:
    """The adapter attached to ``pipe``: its parameters, an off switch, and its state."""

    def __init__(self, pipe: StableDiffusionPipeline, spec: AdapterSpec):
        self.pipe, self.spec = pipe, spec
        pipe.text_encoder.requires_grad_(False)
        pipe.unet.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        self._token_ids: torch.Tensor | None = None
        if spec.kind == "soft_tokens":
            self._add_soft_tokens()
        if spec.on_text:
            pipe.text_encoder.add_adapter(spec.lora_config(spec.text_targets), adapter_name=ADAPTER_NAME)
        if spec.on_unet:
            pipe.unet.add_adapter(spec.lora_config(spec.unet_targets), adapter_name=ADAPTER_NAME)
        for p in self.parameters():
            p.data = p.data.float()

    # -- soft tokens ---------------------------------------------------------------------
    def _add_soft_tokens(self) -> None:
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        names = self.spec.token_names()
        clash = [n for n in names if n in tok.get_vocab()]
        if clash:
            raise ValueError(f"soft token names already in the tokenizer: {clash}")
        tok.add_tokens(names)
        emb = te.get_input_embeddings()
        init = emb.weight.data.mean(0, keepdim=True)
        te.resize_token_embeddings(len(tok))
        emb = te.get_input_embeddings()
        ids = torch.tensor(tok.convert_tokens_to_ids(names))
        emb.weight.data[ids] = init.to(emb.weight.dtype).expand(len(names), -1).clone()
        emb.weight.requires_grad_(True)
        self._token_ids = ids
        keep = torch.zeros(emb.weight.shape[0], 1, dtype=emb.weight.dtype)
        keep[ids] = 1.0
        # Only the new rows learn: the gradient of every other row is zeroed.
        emb.weight.register_hook(lambda g: g * keep.to(g.device, g.dtype))

    @property
    def prompt_prefix(self) -> str:
        """Text to put before every prompt (empty for LoRA)."""
        return " ".join(self.spec.token_names()) + " " if self.spec.kind == "soft_tokens" else ""

    def soft_token_embeddings(self) -> torch.Tensor:
        assert self._token_ids is not None
        return self.pipe.text_encoder.get_input_embeddings().weight[self._token_ids].detach().clone()

    # -- parameters and state ------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        if self.spec.kind == "soft_tokens":
            return [self.pipe.text_encoder.get_input_embeddings().weight]
        params = []
        for module in self._lora_modules():
            params += [p for n, p in module.named_parameters() if "lora_" in n]
        return params

    def _lora_modules(self) -> list[torch.nn.Module]:
        return ([self.pipe.text_encoder] if self.spec.on_text else []) + ([self.pipe.unet] if self.spec.on_unet else [])

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The frozen model: LoRA layers off, soft tokens not prepended (see ``prompt_prefix``)."""
        modules = self._lora_modules()
        for m in modules:
            m.disable_adapters()
        try:
            yield
        finally:
            for m in modules:
                m.enable_adapters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.spec.kind == "soft_tokens":
            out["soft_tokens"] = self.soft_token_embeddings()
        if self.spec.on_text:
            out.update({f"text_encoder.{k}": v.detach().clone() for k, v in
                        get_peft_model_state_dict(self.pipe.text_encoder, adapter_name=ADAPTER_NAME).items()})
        if self.spec.on_unet:
            out.update({f"unet.{k}": v.detach().clone() for k, v in
                        get_peft_model_state_dict(self.pipe.unet, adapter_name=ADAPTER_NAME).items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.spec.kind == "soft_tokens":
            emb = self.pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                emb[self._token_ids] = state["soft_tokens"].to(emb.dtype)
        for prefix, module in (("text_encoder.", self.pipe.text_encoder), ("unet.", self.pipe.unet)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER_NAME)
                unexpected = getattr(result, "unexpected_keys", None)
                if unexpected:
                    raise KeyError(f"adapter state has keys the model lacks: {unexpected[:5]}")


def attach_adapter(pipe: StableDiffusionPipeline, spec: AdapterSpec) -> TrainableAdapter:
    return TrainableAdapter(pipe, spec)
