#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one H100), for the issues "Speed and scale" and
# "Vision":
#  1. benchmarks/throughput.py on CUDA, both workloads: metattn's vmap path against the plain
#     per-task loop and `higher` (when importable), TF32 on (cuDNN's default) and off, and the
#     vmap path with checkpointed inner steps (memory);
#  2. MAML Omniglot 5-way 1-shot (configs/omniglot_5w1s_maml.yaml) for a training budget
#     (GPU_OMNI_BUDGET seconds, default 120) with a periodic evaluation every 500 steps, so
#     metrics.jsonl gives test accuracy against training seconds (time to accuracy).
# Prints markdown tables; JSON and metrics go to $OUT (or runs/gpu_check).
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... picks the interpreter; data as for the
# Omniglot loader: ../shared/data/omniglot or $METATTN_DATA/omniglot)
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-runs/gpu_check}"
BUDGET="${GPU_OMNI_BUDGET:-120}"
mkdir -p "$DEST"
"$PYTHON" - <<'PY' || { echo "gpu_check: no CUDA device visible to $PYTHON"; exit 2; }
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
sys.exit(0 if torch.cuda.is_available() else 1)
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv,noheader
"$PYTHON" -c "import higher" 2>/dev/null && HIGHER=",higher" || HIGHER=""

status=0
run() {  # name, then throughput.py arguments; each run is capped so the whole stays short
  local name=$1; shift
  echo; echo "### $name"
  timeout 90 "$PYTHON" benchmarks/throughput.py --device cuda --json "$DEST/$name.json" "$@" \
    || { echo "gpu_check: $name failed or timed out (rc $?)"; status=1; }
}
run conv4_tf32on        --workload conv4 --methods "vmap$HIGHER" --iters 20 --warmup 5 --tf32 on
run conv4_tf32off       --workload conv4 --methods vmap --no-plain --iters 20 --warmup 5 --tf32 off
run transformer_tf32on  --workload transformer --methods "vmap$HIGHER" --iters 10 --warmup 3 --tf32 on
run transformer_ckpt    --workload transformer --methods vmap --no-plain --checkpoint \
  --iters 10 --warmup 3 --tf32 on

echo; echo "### omniglot_5w1s_maml, ${BUDGET} s of training on CUDA"
timeout $((BUDGET + 150)) "$PYTHON" benchmarks/omniglot.py \
  --configs configs/omniglot_5w1s_maml.yaml --budget "$BUDGET" --out runs/gpu_omniglot \
  --overwrite --set train.device=cuda --set train.schedule=cosine --set train.eval_every=500 \
  --set train.progress=false --set train.checkpoint_every=0 \
  || { echo "gpu_check: omniglot failed or timed out (rc $?)"; status=1; }
cp runs/gpu_omniglot/omniglot_5w1s_maml/metrics.jsonl "$DEST/omniglot_metrics.jsonl" 2>/dev/null
cp runs/gpu_omniglot/omniglot_5w1s_maml/summary.json "$DEST/omniglot_summary.json" 2>/dev/null
"$PYTHON" - "$DEST/omniglot_metrics.jsonl" <<'PY' || true
import json, sys
print("\ntime to accuracy (periodic evaluation, 100 episodes, 10 inner steps):")
print("| step | train s | accuracy |")
print("|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] == "eval":
        print(f"| {r.get('step')} | {r.get('seconds', float('nan')):.1f} | "
              f"{r.get('accuracy', float('nan')):.4f} |")
PY
echo; echo "gpu_check: JSON in $DEST"
exit $status
