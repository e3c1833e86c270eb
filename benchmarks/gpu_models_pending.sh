#!/usr/bin/env bash
# The whole-model rows issue 6 still owes at full depth, split into device calls of under 10 minutes:
#   run(command="bash benchmarks/gpu_models_pending.sh A", timeout_s=600)   # then B, C, D, E
# All of A-F ran on 2026-12-03 (merged: benchmarks/results/2026-12-03-h200-models-all.md). Open: the wall-clock
# prefill 1x4096 (0.983x, 0.988x) and plain-torch.compile decode (0.958x, 0.974x) rows, against device time
# at 1.000x-1.020x and benchmarks/diag_wall_gap.py's 1.009x / 1.035x; rerun F and diag_wall_gap.py together.
# Each writes <tag>.{json,md,png} to $OUT; merge them with
#   python benchmarks/bench_models.py --render <the JSONs> --tag <date>-h200-models-36l
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 QKFUSE_STRICT=1
BENCH="python benchmarks/bench_models.py --out /tmp/bm"
case "${1:-A}" in
  A) $BENCH --budget 540 --models qwen3 --layers 36 --cases generate,fn64 --batches 1,16,64 --tag qwen3-36l-generate ;;  # ~420 s
  B) $BENCH --budget 280 --models qwen3 --layers 36 --cases decode_eager,decode_graph --batches 16 --tag qwen3-36l-decode \
       && $BENCH --models flux --cases prefill_graph --shapes 1x32768,1x4096,8x512 --budget 250 --tag flux-prefill ;;
  D) $BENCH --budget 540 --models qwen3 --layers 36 --cases prefill,decode_eager --shapes 1x32768 --batches 1 --tag qwen3-36l-32k ;;
  E) $BENCH --budget 540 --models qwen3 --layers 36 --cases prefill --shapes 1x4096,8x512 --tag qwen3-36l-prefill ;;
  # F: the two wall-clock rows that dipped below 0.99x with 5 rounds on 2026-12-03 (prefill 1x4096 0.983x,
  # decode_eager 0.958x with paired 1.039x; benchmarks/diag_wall_gap.py then measured 1.009x and 1.035x),
  # again with 15 rounds.
  F) $BENCH --budget 235 --rounds 15 --models qwen3 --layers 36 --cases prefill,decode_eager --shapes 1x4096 --batches 1 \
       --tag qwen3-36l-wall-15 ;;
  C) $BENCH --budget 540 --models gemma3 --cases prefill_graph,decode_graph --shapes 1x4096,8x512 --batches 1,16,64 --tag gemma3 ;;
esac
