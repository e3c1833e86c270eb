#!/usr/bin/env bash
# The GPU tests that failed on 2026-12-02 (HF generate recordings, AOTInductor on CUDA), each with its
# own timeout and its full output in a file, then the fn64 whole-model row.
#   run(command="bash benchmarks/gpu_tests_recheck.sh", timeout_s=600)
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 QKFUSE_STRICT=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T="python -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=long -rA"
timeout 200 $T "tests/gpu/test_compile_modes_gpu.py::test_hf_generate_static_cache_records_no_more_than_inductor" \
  > /tmp/t1.txt 2>&1; echo "rc $?" >> /tmp/t1.txt
grep -v DEBUG /tmp/t1.txt | tail -150 > "$OUT/hf-generate-test.txt"; tail -3 "$OUT/hf-generate-test.txt"
timeout 280 $T tests/gpu/test_export_gpu.py > /tmp/t2.txt 2>&1; echo "rc $?" >> /tmp/t2.txt
grep -v DEBUG /tmp/t2.txt | tail -150 > "$OUT/export-test.txt"; tail -3 "$OUT/export-test.txt"
python benchmarks/bench_models.py --out /tmp/bm --cases fn64 --budget 60 --tag fn64 2>&1 | grep "fn64:"
