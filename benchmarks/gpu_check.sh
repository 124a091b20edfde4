#!/usr/bin/env bash
# One prepared GPU check for the issues "Speed and scale", "Vision" and "In-context
# learners":
#  0. the CUDA-only tests (tests/test_cuda_graph.py: CUDAGraphStep and the recipe's
#     train.cuda_graph against eager steps);
#  1. benchmarks/throughput.py on CUDA, both workloads: metattn's vmap path against the plain
#     per-task loop and `higher` (when importable), TF32 on (cuDNN's default); the vmap path
#     with TF32 off, with chunk_size 8 (memory) and, for the transformer, with checkpointed
#     inner steps (memory);
#  2. Omniglot 5-way 1-shot, configs/omniglot_5w1s_maml_gpu60s.yaml (Meta-SGD at meta-batch
#     16, each step replayed from a CUDA graph: 98.77% after 60 s on an H100), for OMNI_BUDGET
#     seconds of training (default 60, the issue's goal) with the cosine schedule fitted to the
#     budget and a periodic evaluation every OMNI_EVAL_EVERY steps, so metrics.jsonl gives test
#     accuracy against training seconds (time to accuracy). OMNI_RUNS lists the runs, each in
#     its own output folder: "name:KEY=VALUE,KEY=VALUE;name2:..." (default: the config as it
#     is, then plain MAML at meta-batch 32 in the same CUDA graph mode);
#  (PARTS="graph ...": only the CUDA-graph throughput runs of "speed" below, and conv4 under
#     bf16 autocast inside the graph)
#  (PARTS="compile ...": the transformer with MAML(compile_inner=True), the per-task loop
#     whose inner steps run through torch.compile, against the plain loop; not by default)
#  (PARTS="speed ...": vmap variants without the per-step NaN check, in one CUDA graph (also
#     with chunks of 8 tasks, each backward at once: the memory goal) and under bf16 autocast,
#     with torch.profiler tables)
#  3. in-context linear regression at d = 20 (configs/icl_linear_d20.yaml, a looped
#     Transformer: within 0.023 of least squares at every k <= 40 after 4 minutes on an
#     H100) for ICL_MINUTES minutes of training (default 4), error-vs-k table against least
#     squares; ICL_EXTRA adds --set overrides.
# Each part has its own time limit, so a failing part does not take the others with it, and
# the results so far are packed after each part. The default parts' limits add up to more
# than a 10-minute device call: split PARTS over calls there, e.g. PARTS="tests throughput
# omniglot" (about 5 minutes) first, then PARTS="icl" (4 minutes of training, plus start-up and
# evaluation).
# Prints markdown tables; everything it writes is packed into $OUT/gpu_check.tar.gz.
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... picks the interpreter; data as for the
# Omniglot loader: ../shared/data/omniglot or $METATTN_DATA/omniglot). A CPU dry run of the
# same commands: DEVICE=cpu OMNI_BUDGET=5 ICL_MINUTES=0.1 TP_EXTRA="--meta-batch 2"
# OMNI_EXTRA="--episodes 20 --set train.cuda_graph=false" ICL_EXTRA="--prompts 50"
# PARTS="throughput omniglot icl" bash benchmarks/gpu_check.sh
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
export PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
OMNI_BUDGET="${OMNI_BUDGET:-60}"
OMNI_EVAL_EVERY="${OMNI_EVAL_EVERY:-250}"
ICL_MINUTES="${ICL_MINUTES:-4}"
TP_EXTRA="${TP_EXTRA:-}"
OMNI_EXTRA="${OMNI_EXTRA:-}"
ICL_EXTRA="${ICL_EXTRA:-}"
PARTS="${PARTS:-tests throughput omniglot icl}"
OMNI_RUNS="${OMNI_RUNS:-omniglot;omniglot_maml:learner.learn_inner_lr=null,train.meta_batch=32}"
WORK="${GPU_CHECK_DIR:-runs/gpu_check}"
rm -rf "$WORK"; mkdir -p "$WORK"
if [[ "$DEVICE" == cuda* ]]; then
  "$PYTHON" - <<'PY' || { echo "gpu_check: no CUDA device visible to $PYTHON"; exit 2; }
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
sys.exit(0 if torch.cuda.is_available() else 1)
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
    --format=csv,noheader
fi
"$PYTHON" -c "import higher" 2>/dev/null && HIGHER=",higher" || HIGHER=""
T0=$SECONDS
status=0
for p in $PARTS; do
  case $p in tests|throughput|speed|graph|compile|omniglot|icl) ;;
    *) echo "gpu_check: unknown part '$p' in PARTS; use tests, throughput, speed, graph, compile," \
         "omniglot, icl"
       exit 2 ;;
  esac
done
part() { [[ " $PARTS " == *" $1 "* ]]; }
pack() {  # after every part, so a later part that runs out of time loses nothing before it
  [[ -n "${OUT:-}" ]] && tar czf "$OUT/gpu_check.tar.gz" --exclude='*.safetensors' \
    --exclude='*.pt' "$WORK" 2>/dev/null
  return 0
}
secs() { "$PYTHON" -c "import sys; print(int(float(sys.argv[1]) * float(sys.argv[2])))" "$@"; }
tp() {  # limit, name, then throughput.py arguments
  local limit=$1 name=$2; shift 2
  echo; echo "### throughput $name (at $((SECONDS - T0)) s)"
  timeout "$limit" "$PYTHON" benchmarks/throughput.py --device "$DEVICE" \
    --json "$WORK/tp_$name.json" "$@" $TP_EXTRA \
    || { echo "gpu_check: throughput $name failed or timed out (rc $?)"; status=1; }
}
if part tests; then  # the CUDA-only tests (CUDAGraphStep, the recipe's train.cuda_graph)
  echo; echo "### CUDA tests (at $((SECONDS - T0)) s)"
  timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -15 \
    || { echo "gpu_check: CUDA tests failed or timed out"; status=1; }
fi
if part throughput; then
  tp 90 conv4 --workload conv4 --methods "vmap$HIGHER" --iters 10 --warmup 3 --tf32 on
  tp 40 conv4_variants_tf32off --workload conv4 --methods vmap --no-plain --iters 10 \
    --warmup 3 --tf32 off
  tp 40 conv4_chunk8 --workload conv4 --methods vmap --no-plain --chunk-size 8 --iters 10 \
    --warmup 3 --tf32 on
  tp 100 transformer --workload transformer --methods "vmap$HIGHER" --iters 5 --warmup 2 \
    --tf32 on
  tp 40 transformer_ckpt --workload transformer --methods vmap --no-plain --checkpoint \
    --iters 5 --warmup 2 --tf32 on
fi
pack
graph_tp() {  # the meta-step replayed from one CUDA graph (also in chunks of 8 tasks: memory)
  tp 60 conv4_vmap_graph --workload conv4 --methods vmap --no-plain --iters 10 --warmup 3 \
    --tf32 on --cuda-graph
  tp 60 conv4_vmap_chunk8_graph --workload conv4 --methods vmap --no-plain --chunk-size 8 \
    --iters 10 --warmup 3 --tf32 on --cuda-graph
  # bf16 inside the graph: 24.5 ms against 25.2 ms without (H100, 2026-11-27)
  tp 60 conv4_vmap_graph_bf16 --workload conv4 --methods vmap --no-plain --iters 10 \
    --warmup 3 --tf32 on --cuda-graph --autocast bf16
  tp 60 transformer_vmap_graph --workload transformer --methods vmap --no-plain --iters 5 \
    --warmup 2 --tf32 on --cuda-graph
}
if part speed; then  # where the vmap path's time goes, and what removes it
  tp 40 conv4_vmap --workload conv4 --methods vmap --no-plain --iters 10 --warmup 3 --tf32 on
  tp 60 conv4_vmap_nocheck --workload conv4 --methods vmap --no-plain --iters 10 --warmup 3 \
    --tf32 on --check-finite off --profile
  tp 40 conv4_vmap_bf16 --workload conv4 --methods vmap --no-plain --iters 10 --warmup 3 \
    --tf32 on --check-finite off --autocast bf16
  tp 60 transformer_vmap_nocheck --workload transformer --methods vmap --no-plain --iters 5 \
    --warmup 2 --tf32 on --check-finite off --profile
fi
if part speed || part graph; then graph_tp; fi
if part compile; then  # MAML(compile_inner=True) on the GPU (tested on CPU only so far)
  tp 300 transformer_compiled --workload transformer --methods compiled --iters 3 \
    --warmup 2 --tf32 on
fi
pack

# shellcheck disable=SC2086  # the *_EXTRA variables are word lists
omni() {  # output folder, then extra --set arguments: the gpu60s config for OMNI_BUDGET s
  local out=$1; shift
  echo; echo "### omniglot_5w1s_maml_gpu60s $*, ${OMNI_BUDGET} s of training on $DEVICE (at $((SECONDS - T0)) s)"
  timeout $(($(secs "$OMNI_BUDGET" 1) + 150)) "$PYTHON" benchmarks/omniglot.py \
    --configs configs/omniglot_5w1s_maml_gpu60s.yaml --budget "$OMNI_BUDGET" \
    --out "$WORK/$out" --overwrite --set "train.device=$DEVICE" \
    --set "train.eval_every=$OMNI_EVAL_EVERY" --set train.progress=false \
    --set train.checkpoint_every=0 --set train.tensorboard=false "$@" $OMNI_EXTRA \
    || { echo "gpu_check: omniglot $* failed or timed out (rc $?)"; status=1; }
}
ttacc() {  # run folder: the periodic evaluations of its metrics.jsonl as a table
  "$PYTHON" - "$WORK/$1/omniglot_5w1s_maml_gpu60s/metrics.jsonl" <<'PY' || true
import json, sys
print(f"\n{sys.argv[1]}: time to accuracy (periodic evaluation: 100 episodes, 10 inner "
      "steps):")
print("| step | train s | accuracy |")
print("|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "eval":
        print(f"| {r.get('step')} | {r.get('seconds', float('nan')):.1f} | "
              f"{r.get('accuracy', float('nan')):.4f} |")
PY
}
if part omniglot; then
  IFS=';' read -ra omni_runs <<< "$OMNI_RUNS"
  for spec in "${omni_runs[@]}"; do  # name:KEY=VALUE,KEY=VALUE (no commas inside a VALUE)
    name=${spec%%:*}; sets=()
    [[ -z "$name" ]] && { echo "gpu_check: OMNI_RUNS entry '$spec' has no name"; continue; }
    [[ "$spec" == *:* ]] && IFS=',' read -ra kv <<< "${spec#*:}" \
      && for s in "${kv[@]}"; do sets+=(--set "$s"); done
    omni "$name" "${sets[@]}"
    ttacc "$name"
    pack
  done
fi
pack

if part icl; then
  echo; echo "### icl_linear_d20, ${ICL_MINUTES} min of training on $DEVICE (at $((SECONDS - T0)) s)"
  timeout $(($(secs "$ICL_MINUTES" 60) + 120)) "$PYTHON" benchmarks/icl.py linear \
    --config configs/icl_linear_d20.yaml --minutes "$ICL_MINUTES" --no-maml \
    --out "$WORK/icl_d20" --set "train.device=$DEVICE" --set train.progress=false \
    --set train.tensorboard=false $ICL_EXTRA \
    || { echo "gpu_check: icl failed or timed out (rc $?)"; status=1; }
fi

pack
echo; echo "gpu_check: done in $((SECONDS - T0)) s, status $status"
exit $status
