"""LoRA math on the canonical in-memory form (``LoraState``)."""
