#!/usr/bin/env bash
# Device time of the per-head kernel at one shape across past commits (a regression hunt):
# .bisect/<commit>/ holds `git archive <commit> qkfuse benchmarks/bench_qk_norm_rope.py`.
#   run(command="bash benchmarks/bisect_kernel.sh 'prefill 32k'", carry=[".bisect"])
only=${1:-prefill 32k}
for d in .bisect/*/; do
  c=$(basename "$d")
  line=$(cd "$d" && PYTHONPATH=. timeout 70 python benchmarks/bench_qk_norm_rope.py --shapes main --only "$only" \
         --no-flashinfer --no-write 2>&1 | grep -E "^\[ *[0-9]+s\]" | tail -1)
  echo "$c $line"
done
