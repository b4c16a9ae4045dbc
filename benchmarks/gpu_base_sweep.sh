#!/usr/bin/env bash
# Base-stage recipe variants trained side by side on one GPU, then judged (32x32, no SR) and probed
# with word_use: minutes on a GPU for what takes an hour each on 2 CPU cores. The CUDA test suite
# runs beside them. Each variant is a recipe plus --set overrides; a variant still running at
# TRAIN_S seconds is stopped (SIGINT: it saves a checkpoint) and its latest checkpoint is judged.
#   benchmarks/gpu_base_sweep.sh OUT_DIR CLIP_WEIGHTS 'name|recipe|--set a=b --set c=d' ...
# OUT_DIR gets sweep.log, results.json (one judge report per variant), word-use.txt, pytest.log and,
# per variant, <name>.unet-fp16.safetensors: the bundle without its CLIP tensors, in fp16 (small
# enough to bring back; put the CLIP back with the same CLIP's weights). CURVE=K also judges every
# K-th step's checkpoint of each run (benchmarks/checkpoint_curve.py: curve/results.json, curve.txt).
set -u
OUT=$1; CLIP=$2; shift 2
TRAIN_S=${TRAIN_S:-420}; DEV=${DEV:-cuda}; N=${N:-200}
RUNS=${RUNS:-gpu-runs}; rm -rf "$RUNS"; mkdir -p "$OUT" "$RUNS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/sweep.log"; }
log "start on $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
if [ -n "${PYTEST:-}" ]; then
  timeout 300 python3 -m pytest -q $PYTEST > "$OUT/pytest.log" 2>&1 &
  TESTS=$!
fi
names=()
for spec in "$@"; do
  IFS='|' read -r name recipe sets <<< "$spec"
  names+=("$name")
  # shellcheck disable=SC2086  # $sets is a list of --set options
  timeout -s INT "$TRAIN_S" python3 -m ctxdiff --device "$DEV" --quiet train -r "$recipe" \
    --set output="$RUNS/$name" --set model.clip.weights="$CLIP" --set train.sample_every=0 \
    --set train.checkpoint_every=500 --set train.num_workers=2 $sets > "$OUT/train-$name.log" 2>&1 &
done
wait $(jobs -p | grep -v "^${TESTS:-x}$")
log "training done"
for name in "${names[@]}"; do
  run=$RUNS/$name
  if [ ! -f "$run/model.safetensors" ]; then  # stopped early: export the latest checkpoint
    python3 - "$run" <<'EOF'
import sys
from pathlib import Path
import torch
from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import Trainer
run = Path(sys.argv[1])
trainer = Trainer(read_recipe(run / "recipe.yaml", []), torch.device("cpu"), resume=True)
print(f"{run}: exported step {trainer.step} to {trainer.export()}")
EOF
  fi
  log "$name: $(tail -1 "$run/metrics.jsonl" 2>/dev/null)"
done
for name in "${names[@]}"; do
  timeout 240 python3 benchmarks/default_model_quality.py --model "$RUNS/$name/model.safetensors" --base-only \
    --n "$N" --device "$DEV" > "$OUT/judge-$name.json" 2>> "$OUT/sweep.log" &
done
wait $(jobs -p | grep -v "^${TESTS:-x}$")
python3 - "$OUT" "$RUNS" "${names[@]}" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
out, runs, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
results = {}
for name in names:
    try:
        results[name] = json.loads((out / f"judge-{name}.json").read_text())
    except (OSError, ValueError) as err:
        results[name] = {"error": str(err)}
    bundle = runs / name / "model.safetensors"
    if bundle.exists():
        with safe_open(bundle, "pt") as f:
            tensors = {k: f.get_tensor(k).half() for k in f.keys() if not k.startswith("clip.")}
            save_file(tensors, out / f"{name}.unet-fp16.safetensors", metadata=f.metadata())
(out / "results.json").write_text(json.dumps(results, indent=1))
for name, r in results.items():
    s = r.get("single", {})
    print(name, {k: round(v, 3) for k, v in s.items()} if s else r)
EOF
bundles=(); for name in "${names[@]}"; do bundles+=("$RUNS/$name/model.safetensors"); done
timeout 180 python3 benchmarks/word_use.py "${bundles[@]}" > "$OUT/word-use.txt" 2>&1
for name in "${names[@]}"; do
  sed -i "s|$RUNS/$name/model.safetensors|$name|" "$OUT/word-use.txt"
done
rm -f "$OUT"/judge-*.json
if [ -n "${CURVE:-}" ]; then
  runs=(); for name in "${names[@]}"; do runs+=("$RUNS/$name"); done
  timeout 300 python3 benchmarks/checkpoint_curve.py "${runs[@]}" --n "$N" --every "$CURVE" --device "$DEV" \
    --out "$OUT/curve" > "$OUT/curve.txt" 2>&1
fi
[ -n "${TESTS:-}" ] && { wait "$TESTS"; log "pytest exit $? ($(tail -1 "$OUT/pytest.log"))"; }
log "done"
