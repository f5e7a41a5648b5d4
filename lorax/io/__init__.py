"""File access: safetensors headers and streaming writes, atomic outputs, safe pickle loading, model checkpoints."""
