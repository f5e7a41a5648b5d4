#!/usr/bin/env bash
# lorax end to end on a tiny model, offline: `make demo` runs this with the venv's bin first on PATH.
# Everything lands in demo-out/. Later stages (train → generate → merge) are added as the commands land.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=demo-out
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore

echo "== building a tiny SD1 model and a LoRA + embedding for it"
python scripts/make_demo_lora.py "$OUT"

echo "== lorax inspect: the LoRA, the embedding, the model folder"
lorax inspect "$OUT/demo-lora.safetensors" "$OUT/s1-embedding.pt" "$OUT/tiny-sd1"
lorax inspect --json "$OUT/demo-lora.safetensors" > "$OUT/demo-lora.inspect.json"
echo "wrote $OUT/demo-lora.inspect.json"

echo "== lorax convert: kohya → diffusers, then inspect the result"
lorax convert "$OUT/demo-lora.safetensors" --to diffusers -o "$OUT/demo-lora.diffusers.safetensors" --force
lorax inspect "$OUT/demo-lora.diffusers.safetensors"
