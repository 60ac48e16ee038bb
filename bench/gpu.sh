#!/usr/bin/env bash
# The three benchmarks at the real shapes on one GPU, with model FLOP utilisation.
#
#   bench/gpu.sh            # on a GPU: Llama-3.2-1B shapes (random bf16 weights), SAE D=2048 N=32768 B=4096
#   bench/gpu.sh --smoke    # anywhere (CPU too): tiny shapes, to check the script end to end
#   bench/gpu.sh harvest    # only the named benchmarks (sae_step, harvest, pipeline), to fit a time limit
#
# MFU is against PEAK_TFLOPS, default 989: NVIDIA's H100 SXM dense bf16 figure
# (no sparsity). Set PEAK_TFLOPS=756 for an H100 PCIe, 989 also for an H200. The SAE step counts
# 10·D·N FLOPs per token dense, 4·D·N + 6·K·D sparse (bench/common.py: sae_train_flops_per_token).
# Needs JAX with CUDA (pip install -e '.[cuda12,test]'). Each benchmark's
# output goes to the terminal and to $OUT (or bench/out/), ending in one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PEAK=${PEAK_TFLOPS:-989}
DEST=${OUT:-bench/out}
mkdir -p "$DEST"
SMOKE=0
[ "${1:-}" = "--smoke" ] && { SMOKE=1; shift; }
ONLY=" ${*:-sae_step harvest pipeline} "

if [ "$SMOKE" = 0 ]; then
  "$PY" -c 'import jax, sys; d = jax.devices()[0]; sys.exit(0 if d.platform == "gpu" else f"bench/gpu.sh: expected a GPU, JAX sees {d} (use --smoke on CPU)")'
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
echo "peak for MFU: $PEAK TFLOP/s (bf16 dense)"

run() {  # name, then the command; the output is kept in $DEST/name.txt
  local name=$1; shift
  case "$ONLY" in *" ${name%%_*} "*|*" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  "$@" 2>&1 | grep -v -e '^W[0-9]' -e 'Loading weights' | tee "$DEST/$name.txt"
}

if [ "$SMOKE" = 1 ]; then
  run sae_step "$PY" bench/sae_step.py --shapes smoke --archs relu,topk --variants jax-auto,jax-dense,jax-sparse,jax-sparse-scatter,jax-sparse-bf16,torch-fused,torch-sparse --rounds 2 --peak-tflops "$PEAK"
  run harvest "$PY" bench/harvest.py --preset smoke --seqs 2 --context 32 --rounds 2 --peak-tflops "$PEAK"
  run pipeline "$PY" bench/pipeline.py --preset smoke --seqs 2 --context 32 --batch 32 --buffer 256 --steps 4 --warmup 2 --peak-tflops "$PEAK"
else
  run sae_step "$PY" bench/sae_step.py --shapes gpu --archs relu,topk \
    --variants jax-auto,jax-dense,jax-sparse,jax-sparse-scatter,jax-dense-bf16,jax-sparse-bf16,jax-sparse-scatter-bf16,torch-eager,torch-fused,torch-compile,torch-sparse --rounds 7 --peak-tflops "$PEAK"
  run harvest "$PY" bench/harvest.py --preset 1b --seqs 8 --context 1024 --dtype bfloat16 --rounds 7 --peak-tflops "$PEAK"
  run pipeline_dense "$PY" bench/pipeline.py --preset 1b --seqs 8 --context 1024 --dtype bfloat16 --batch 4096 \
    --sae-dtype bfloat16 --buffer 262144 --steps 64 --warmup 8 --peak-tflops "$PEAK"
  run pipeline_sparse_topk "$PY" bench/pipeline.py --preset 1b --seqs 8 --context 1024 --dtype bfloat16 --batch 4096 \
    --arch topk --kernel sparse --sae-dtype bfloat16 --buffer 262144 --steps 64 --warmup 8 --peak-tflops "$PEAK"
fi
echo "done: outputs in $DEST"
