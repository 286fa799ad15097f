"""What is finetuned (peft LoRA on text encoder and/or U-Net, or soft prefix tokens) and how it
is exported so that a stock diffusers pipeline loads it."""

from fairness.adapters.trainable import AdapterSpec, TrainableAdapter, attach_adapter
from fairness.adapters.io import export_adapter, load_adapter_into, read_adapter_manifest

__all__ = [
    "AdapterSpec", "TrainableAdapter", "attach_adapter", "export_adapter", "load_adapter_into",
    "read_adapter_manifest",
]
