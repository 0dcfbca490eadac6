#!/usr/bin/env bash
# Llama-2-7B shape on one GPU: ours vs transformers, bfloat16, batch 1 and 8, eager and compiled,
# plus ours weight-only int8 (compiled). Random weights generated on the GPU (--no-checkpoint: no
# 13 GB checkpoint written or read, so no load times). Installs nothing from the network.
#
#   bash benchmarks/gpu.sh          # JSON into $OUT if set, else benchmarks/results/
#
# Three runs, each in its own process under its own time limit (all together < 8 minutes on an H100):
#   gpu_7b_bf16_eager.json     ours, transformers (dynamic cache)                     <= 130 s
#   gpu_7b_bf16_compiled.json  ours (CUDA graphs), transformers (static cache, auto-compile) <= 200 s
#   gpu_7b_int8_compiled.json  ours bf16 and ours int8, both compiled                  <= 140 s
# GEN_TOKENS (default 64) and REPEATS (default 3) override the lengths; SHAPE=tiny DEVICE=cpu
# runs the same script as a dry run on a CPU.
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:-$PWD}"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

COMMON=(--shape "${SHAPE:-7b}" --device "${DEVICE:-cuda}" --dtype bfloat16 --no-checkpoint --batch-sizes 1,8 --prompt-len 128
        --gen-tokens "${GEN_TOKENS:-64}" --repeats "${REPEATS:-3}")
status=0
run() {  # run LIMIT_S NAME ARGS...
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" python3 benchmarks/bench.py "${COMMON[@]}" "$@" --out "$RESULTS/$name.json" \
    | grep -v '^{'   # the table; the JSON line is in the file
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}
S="${SHAPE:-7b}"
run 130 "gpu_${S}_bf16_eager"
run 200 "gpu_${S}_bf16_compiled" --compile
run 140 "gpu_${S}_int8_compiled" --compile --quantize int8 --skip-hf
ls -l "$RESULTS"
exit $status
