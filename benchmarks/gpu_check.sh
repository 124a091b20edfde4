#!/usr/bin/env bash
# GPU throughput check (< 5 minutes on one H100): benchmarks/throughput.py on CUDA for both
# workloads, metattn's vmap path against the plain per-task loop, TF32 off and on, plus the
# vmap path with checkpointed inner steps (memory). Prints markdown tables; JSON in $OUT (or
# runs/gpu_check). Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
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
run() {  # name, then throughput.py arguments; each run is capped so the whole stays < 5 min
  local name=$1; shift
  echo; echo "### $name"
  timeout 75 "$PYTHON" benchmarks/throughput.py --device cuda --json "$DEST/$name.json" "$@" \
    || { echo "gpu_check: $name failed or timed out (rc $?)"; status=1; }
}
# plain loop (the reference: ratios and the float64 gradient check) + vmap, TF32 off and on
run conv4_tf32off       --workload conv4 --methods "vmap$HIGHER" --iters 10 --warmup 3 --tf32 off
run conv4_tf32on        --workload conv4 --methods vmap --iters 10 --warmup 3 --tf32 on
run transformer_tf32off --workload transformer --methods "vmap$HIGHER" --iters 5 --warmup 2 --tf32 off
run transformer_tf32on  --workload transformer --methods vmap --iters 5 --warmup 2 --tf32 on
# memory: checkpointed inner steps (flat in inner_steps) against the stored graph, vmap only
run transformer_ckpt    --workload transformer --methods vmap --no-plain --checkpoint \
  --iters 10 --warmup 2 --tf32 on
echo; echo "gpu_check: JSON in $DEST"
exit $status
