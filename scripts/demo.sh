#!/usr/bin/env bash
# lorax end to end on a tiny model, offline: `make demo` runs this with the venv's bin first on PATH.
# Part 1 tours the file tools on a tiny random model; part 2 is the main story on the built-in `shapes` model:
# teach it a colour it never saw, generate before/after, a labelled scale sweep and an X/Y plot, merge the LoRA in;
# part 3 does the same on the built-in Flux-architecture `shapes-flux` model (train, convert to BFL keys, merge).
# Everything lands in demo-out/.
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

echo
echo "== part 2: teach the built-in shapes model a colour it never saw ('a sks circle' = purple circles)"
python -c "from lorax.zoo.shapes import write_concept_dir; write_concept_dir('$OUT/sks-circle', 'circle', 'purple', 8, caption='a sks circle')"
echo "training images: $OUT/sks-circle/"

echo "== lorax generate: the base model before training (same seeds as after)"
lorax generate "a sks circle" --model shapes -n 8 --seed 1 --grid -o "$OUT/before" --force > /dev/null
echo "before: $OUT/before/a-sks-circle-1-grid.png"

echo "== lorax train: DreamBooth LoRA with prior preservation, a checkpoint halfway, loss curve and validation samples"
lorax train "$OUT/sks-circle" --model shapes --steps 500 --batch-size 4 --lr 5e-3 --snr-gamma 5 \
  --class-prompt "a circle" --num-class-images 24 --checkpoint-every 250 \
  --validation-prompt "a sks circle" --validation-every 250 -o "$OUT/sks-circle.safetensors" --force
echo "loss plot (checkpoint marked): $OUT/sks-circle.loss.png; validation samples: $OUT/sks-circle.samples.png"
echo "resolved config: $OUT/sks-circle.toml"
lorax inspect "$OUT/sks-circle.safetensors"

echo "== lorax generate: after training, a labelled LoRA scale sweep 0 → 1, and an X/Y plot (scale × prompt)"
lorax generate "a sks circle" --model shapes -n 8 --seed 1 --grid -o "$OUT/after" --force \
  --lora "$OUT/sks-circle.safetensors" > /dev/null
lorax generate "a sks circle" --model shapes -n 3 --seed 1 -o "$OUT/sweep" --force \
  --lora "$OUT/sks-circle.safetensors" --sweep-scale 0,0.25,0.5,0.75,1 > /dev/null
lorax generate "a sks circle" --model shapes --seed 1 -o "$OUT/xy" --force \
  --lora "$OUT/sks-circle.safetensors" --xy scale=0,0.5,1 --xy prompt=circle,square > /dev/null
echo "after: $OUT/after/a-sks-circle-1-grid.png; sweep: $OUT/sweep/a-sks-circle-1-sweep.png (columns: LoRA scale)"
echo "X/Y plot: $OUT/xy/a-sks-circle-1-xy.png (columns: LoRA scale; rows: 'circle' replaced by 'square')"

echo "== lorax merge: the LoRA baked into the shapes model (a plain diffusers folder any SD tool loads)"
lorax merge shapes "$OUT/sks-circle.safetensors" -o "$OUT/shapes-sks-circle" --force
lorax generate "a sks circle" --model "$OUT/shapes-sks-circle" -n 8 --seed 1 --grid -o "$OUT/merged" --force > /dev/null

echo "== how purple circles score (the shapes world's colour and shape readers)"
python scripts/demo_score.py "a purple circle" "$OUT/before" "$OUT/after" "$OUT/merged"

echo "== lorax invert / pivot: a new token <s1> for the same concept (short runs, to show the commands)"
lorax invert "$OUT/sks-circle" --model shapes --token '<s1>' --token-at-data 'sks|<s1>' \
  --init-token 'red blue' --steps 30 -o "$OUT/s1.pt" --force
lorax pivot "$OUT/sks-circle" --model shapes --token '<s1>' --token-at-data 'sks|<s1>' \
  --init-token 'red blue' --ti-steps 20 --steps 20 -o "$OUT/s1-pivot.safetensors" --force
echo "learned token: $OUT/s1.pt; LoRA + token in one file: $OUT/s1-pivot.safetensors"

echo
echo "== part 3: the same concept on the built-in shapes-flux model (FLUX.1 architecture, flow matching)"
lorax generate "a sks circle" --model shapes-flux -n 8 --seed 1 --grid -o "$OUT/flux-before" --force > /dev/null
lorax train "$OUT/sks-circle" --model shapes-flux --instance-prompt "a sks circle" --class-prompt "a circle" \
  --num-class-images 32 --prior-weight 2.0 --targets attn --rank 8 --learning-rate 3e-3 --steps 300 \
  -o "$OUT/flux-sks-circle.safetensors" --force
lorax generate "a sks circle" --model shapes-flux -n 8 --seed 1 --grid -o "$OUT/flux-after" --force \
  --lora "$OUT/flux-sks-circle.safetensors" > /dev/null
echo "== lorax convert: the kohya Flux LoRA → BFL/ComfyUI keys; lorax merge: into the shapes-flux model"
lorax convert "$OUT/flux-sks-circle.safetensors" --to bfl -o "$OUT/flux-sks-circle.bfl.safetensors" --force
lorax inspect "$OUT/flux-sks-circle.bfl.safetensors"
lorax merge shapes-flux "$OUT/flux-sks-circle.bfl.safetensors" -o "$OUT/shapes-flux-sks-circle" --force
lorax generate "a sks circle" --model "$OUT/shapes-flux-sks-circle" -n 8 --seed 1 --grid -o "$OUT/flux-merged" \
  --force > /dev/null
python scripts/demo_score.py "a purple circle" "$OUT/flux-before" "$OUT/flux-after" "$OUT/flux-merged"
echo
echo "demo done: open the PNGs under $OUT/ (before/, after/, sweep/, xy/, merged/, sks-circle.loss.png,"
echo "  sks-circle.samples.png, flux-before/, flux-after/, flux-merged/)"
