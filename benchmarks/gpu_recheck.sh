#!/usr/bin/env bash
# The two GPU tests that failed in 2026-12-02-h200 run 1 (full output), then a whole-model batch.
#   run(command="bash benchmarks/gpu_recheck.sh", timeout_s=600)
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 QKFUSE_STRICT=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=long \
  "tests/gpu/test_compile_modes_gpu.py::test_hf_generate_static_cache_records_no_more_than_inductor" \
  "tests/gpu/test_export_gpu.py" 2>&1 | grep -v DEBUG > "$OUT/gpu-tests-recheck.txt"
tail -5 "$OUT/gpu-tests-recheck.txt"
# the Flux rows at 1x32768 were the one wall-clock case below 0.99x (2026-12-01); now by device time
python benchmarks/bench_models.py --out /tmp/bm --models flux --cases prefill_graph --shapes 1x32768,1x4096,8x512 \
  --budget 300 --tag flux-prefill
ls "$OUT"
# the 36-layer rows not measured yet: decode under plain torch.compile (bs1), decode device time at bs16
python benchmarks/bench_models.py --out /tmp/bm --models qwen3 --layers 36 --cases decode_eager,decode_graph \
  --batches 16 --budget 260 --tag qwen3-36l-decode
ls "$OUT"
