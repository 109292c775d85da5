"""Merging LoRA sub-models in the space of their weight deltas, exactly."""

from dtm.merge.lora import AdapterSet, linear_concat, read_adapter

__all__ = ["AdapterSet", "linear_concat", "read_adapter"]
