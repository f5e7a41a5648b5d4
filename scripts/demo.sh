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

echo "== lorax convert: the tiny model folder → one single-file checkpoint (original layout)"
lorax convert "$OUT/tiny-sd1" -o "$OUT/tiny-sd1.safetensors" --force

echo "== lorax merge: the LoRA into the single file (streaming) and into the diffusers folder"
lorax merge "$OUT/tiny-sd1.safetensors" "$OUT/demo-lora.safetensors:0.8" -o "$OUT/tiny-sd1-merged.safetensors" --force
lorax merge "$OUT/tiny-sd1" "$OUT/demo-lora.safetensors" --alpha 0.8 --alpha-text 0.5 -o "$OUT/tiny-sd1-merged" --force

echo "== lorax mix: two LoRAs as one, exact and SVD-compressed to rank 2"
lorax mix "$OUT/demo-lora.safetensors:0.7" "$OUT/demo-lora.diffusers.safetensors:0.3" -o "$OUT/mixed.safetensors" --force
lorax mix "$OUT/demo-lora.safetensors:0.7" "$OUT/demo-lora.diffusers.safetensors:0.3" --rank 2 -o "$OUT/mixed-r2.safetensors" --force

echo "== lorax extract: the LoRA back out of the merged model"
lorax extract "$OUT/tiny-sd1.safetensors" "$OUT/tiny-sd1-merged.safetensors" --rank 4 --targets all \
  -o "$OUT/extracted.safetensors" --force

echo "== lorax train: a LoRA for a new concept ('a sks star', purple stars) with a checkpoint and a resume"
python -c "from lorax.zoo.shapes import write_concept_dir; write_concept_dir('$OUT/sks-star', 'star', 'purple', 8, caption='a sks star')"
lorax train "$OUT/sks-star" --model "$OUT/tiny-sd1" --resolution 32 --steps 40 --lr 1e-3 --checkpoint-every 20 \
  -o "$OUT/sks-star.safetensors" --force
lorax train "$OUT/sks-star" --model "$OUT/tiny-sd1" --resolution 32 --steps 60 --lr 1e-3 \
  --resume "$OUT/sks-star.checkpoints" -o "$OUT/sks-star-60.safetensors" --force
echo "loss curve: $OUT/sks-star.loss.png, resolved config: $OUT/sks-star.toml"

echo "== lorax train on the built-in shapes model: a colour it never saw ('a sks circle' = purple circles)"
python -c "from lorax.zoo.shapes import write_concept_dir; write_concept_dir('$OUT/sks-circle', 'circle', 'purple', 8, caption='a sks circle')"
lorax train "$OUT/sks-circle" --model shapes --steps 200 --batch-size 4 --lr 5e-3 --snr-gamma 5 \
  --validation-prompt "a sks circle" --validation-every 100 -o "$OUT/sks-circle.safetensors" --force
echo "loss curve: $OUT/sks-circle.loss.png, samples: $OUT/sks-circle.samples/, resolved config: $OUT/sks-circle.toml"

echo "== lorax generate: before and after the trained LoRA (same seeds), and a scale sweep 0 → 1 as one grid"
lorax generate "a sks star" --model "$OUT/tiny-sd1" --size 32x32 -n 2 --seed 1 --grid -o "$OUT/generate/before" --force
lorax generate "a sks star" --model "$OUT/tiny-sd1" --size 32x32 -n 2 --seed 1 --grid -o "$OUT/generate/after" --force \
  --lora "$OUT/sks-star-60.safetensors"
lorax generate "a sks star" --model "$OUT/tiny-sd1" --size 32x32 -n 2 --seed 1 -o "$OUT/generate/sweep" --force \
  --lora "$OUT/sks-star-60.safetensors" --sweep-scale 0,0.25,0.5,0.75,1
echo "sweep grid: $OUT/generate/sweep/a-sks-star-1-sweep.png (rows: seeds, columns: LoRA scale)"

echo "== lorax merge: the trained LoRA folded into the model (a plain diffusers folder any SD tool loads)"
lorax merge "$OUT/tiny-sd1" "$OUT/sks-star-60.safetensors" -o "$OUT/tiny-sd1-sks-star" --force

echo "== lorax invert / pivot: a new token <s1> for the same stars (textual inversion, then pivotal tuning)"
lorax invert "$OUT/sks-star" --model "$OUT/tiny-sd1" --resolution 32 --token '<s1>' --token-at-data 'sks star|<s1>' \
  --init-token star --steps 10 -o "$OUT/s1-star.pt" --force
lorax pivot "$OUT/sks-star" --model "$OUT/tiny-sd1" --resolution 32 --token '<s1>' --token-at-data 'sks star|<s1>' \
  --init-token star --ti-steps 5 --steps 5 -o "$OUT/s1-star-pivot.safetensors" --force
echo "learned token: $OUT/s1-star.pt; LoRA + token in one file: $OUT/s1-star-pivot.safetensors"
