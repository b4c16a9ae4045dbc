#!/usr/bin/env bash
# One GPU session, end to end: the test suite on CUDA, the adapter ablation (recipes/shapes-base.yaml
# and recipes/shapes-base-noadapter.yaml: with and without the adapter, same seed and steps) trained and evaluated on the GPU, the SR
# stage that completes the default cascade, and the GPU benchmarks; the shapes CLIP is trained
# first by recipes/shapes-clip.yaml; then SD sampling speed against diffusers (benchmarks/sd_speed.py) and
# the SD video-editing cost (benchmarks/video_edit.py cost --model sd15). diffusers and transformers
# must be installed there (carried as wheels).
#   benchmarks/gpu_session.sh OUT_DIR            (SMOKE=1 for a few-step CPU rehearsal)
set -u
OUT=${1:-gpu-out}
mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DEV=cuda; WORKERS=4; SETS=(); PYTEST_ARGS=(-n 4 tests/); ABLATION=(--bpd-timesteps 200)
BENCH=("--backbone shapes-base --batch 32" "--backbone base64 --adapter paper --batch 16 --precision bf16")
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; WORKERS=0; PYTEST_ARGS=(tests/test_diffusion.py)
  SETS=(--set train.steps=4 --set train.checkpoint_every=2 --set train.sample_every=2 --set train.log_every=1
        --set sample.steps=3 --set sample.sr_steps=3)
  ABLATION=(--n 8 --curve-n 4 --steps 3 --guidance 1.5,3 --bpd-n 4 --bpd-timesteps 3 --batch 8)
  BENCH=("--backbone tiny --batch 2 --reps 1")
fi
RUNS=gpu-runs; rm -rf "$RUNS"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/logs/session.log"; }
train() {  # recipe output [extra --set ...]
  local recipe=$1 output=$2; shift 2
  python3 -m ctxdiff --device $DEV --quiet train -r "$recipe" --set output="$RUNS/$output" \
    --set train.num_workers=$WORKERS "${SETS[@]}" "$@" > "$OUT/logs/train-$output.log" 2>&1
  log "train $output exit $?"
}
log "start on $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
timeout 300 python3 -m pytest -q "${PYTEST_ARGS[@]}" > "$OUT/logs/pytest.log" 2>&1 &
P=$!
CLIP_STEPS=(); [ "${SMOKE:-0}" = 1 ] && CLIP_STEPS=(--set train.steps=3 --set train.batch_size=16)
python3 -m ctxdiff --device $DEV --quiet train -r recipes/shapes-clip.yaml --set output=$RUNS/shapes-clip \
  "${CLIP_STEPS[@]}" > "$OUT/logs/train-clip.log" 2>&1
log "train shapes-clip exit $? $(cat $RUNS/shapes-clip/clip-eval.json 2>/dev/null | tr -d '\n ')"
SETS+=(--set model.clip.weights=$RUNS/shapes-clip/clip.safetensors)
train recipes/shapes-base.yaml shapes-base &
A=$!
train recipes/shapes-base-noadapter.yaml shapes-base-noadapter &
B=$!
wait $P
log "pytest exit $? ($(tail -1 "$OUT/logs/pytest.log"))"
wait $A
train recipes/shapes-sr.yaml shapes --set model.base_model=$RUNS/shapes-base/model.safetensors &
C=$!
wait $B
timeout 240 python3 benchmarks/adapter_ablation.py $RUNS/shapes-base $RUNS/shapes-base-noadapter --device $DEV \
  "${ABLATION[@]}" --out "$OUT/ablation" > "$OUT/logs/ablation.log" 2>&1
log "ablation exit $?"
for args in "${BENCH[@]}"; do
  timeout 120 python3 benchmarks/adapter_overhead.py --device $DEV $args >> "$OUT/logs/bench-adapter.log" 2>&1
done
log "adapter overhead done"
SD_SPEED=(); [ "${SMOKE:-0}" = 1 ] && SD_SPEED=(--tiny --steps 3 --reps 1)
timeout 300 python3 benchmarks/sd_speed.py --device $DEV "${SD_SPEED[@]}" > "$OUT/logs/bench-sd-speed.log" 2>&1
log "sd speed (issue 20) exit $? $(tail -1 "$OUT/logs/bench-sd-speed.log")"
if [ "${SMOKE:-0}" != 1 ]; then
  timeout 300 python3 benchmarks/video_edit.py cost --device $DEV --model sd15 > "$OUT/logs/bench-video-cost.log" 2>&1
  log "video edit cost (issue 19) exit $?"
fi
wait $C
cp $RUNS/shapes-clip/clip-eval.json "$OUT/ablation/" 2>/dev/null
for run in shapes-base shapes-base-noadapter shapes; do
  mkdir -p "$OUT/ablation/samples-$run" && cp $RUNS/$run/samples/*.png "$OUT/ablation/samples-$run/" 2>/dev/null
  cp $RUNS/$run/metrics.jsonl "$OUT/ablation/metrics-$run.jsonl" 2>/dev/null
done
cp $RUNS/shapes/model.safetensors "$OUT/shapes-default.safetensors" 2>/dev/null
log "done"
