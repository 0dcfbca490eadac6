#!/usr/bin/env bash
# Llama-2-7B shape on one GPU: ours vs transformers, bfloat16, batch 1 and 8, eager and compiled,
# plus ours weight-only int8 (compiled). Random weights generated on the GPU (--no-checkpoint: no
# 13 GB checkpoint written or read, so no load times). Installs nothing from the network.
#
#   bash benchmarks/gpu.sh                    # JSON into $OUT if set, else benchmarks/results/
#   RUNS=eager,compiled bash benchmarks/gpu.sh   # some of the runs (eager, compiled, int8)
#
# Missing packages travel as wheels in .whl/ (installed first, with no network): fairscale is on
# PyPI only as a source archive, so build its (pure Python) wheel once on a machine with PyPI:
#   python3 -m pip wheel --no-deps fairscale==0.4.13 -w .whl
# and carry .whl (the device tool's `carry`). Every wheel there must suit the GPU machine's Python
# and torch: fairscale 0.4.13 is py3-none-any and needs torch>=1.8, numpy>=1.22.
#
# Three runs, each in its own process under its own time limit (LIMIT_EAGER, LIMIT_COMPILED,
# LIMIT_INT8 seconds override them). The limits allow for a cold machine: the first import of torch
# and CUDA, and Inductor/Triton compiling every kernel from scratch with no cache (several minutes
# for the two compiled batch sizes of a 7B):
#   gpu_7b_bf16_eager.json     ours, transformers (dynamic cache)                        <= 240 s
#   gpu_7b_bf16_compiled.json  ours (CUDA graphs), transformers (static cache, auto-compile) <= 480 s
#   gpu_7b_int8_compiled.json  ours bf16 and ours int8, both compiled                     <= 420 s
# Together that exceeds one 10-minute device call: split them, e.g. RUNS=eager,int8 then RUNS=compiled.
# Each JSON is rewritten after every timed measurement ("stage" says how far it got), so a run
# stopped at its limit still leaves what it measured.
# GEN_TOKENS (default 64) and REPEATS (default 3) override the lengths; SHAPE=tiny DEVICE=cpu
# runs the same script as a dry run on a CPU.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels (.whl/) failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the repo, before the machine's own site-packages
fi
python3 -c "import fairscale" 2>/dev/null || {
  echo "fairscale is not installed: build its wheel into .whl/ (see the top of this script) and carry it" >&2; exit 2; }
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
python3 -c "import sys, torch, transformers, fairscale; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'transformers', transformers.__version__, 'fairscale', fairscale.__version__)"

S="${SHAPE:-7b}"
COMMON=(--shape "$S" --device "${DEVICE:-cuda}" --dtype bfloat16 --no-checkpoint --batch-sizes 1,8 --prompt-len 128
        --gen-tokens "${GEN_TOKENS:-64}" --repeats "${REPEATS:-3}")
RUNS=",${RUNS:-eager,compiled,int8},"
status=0
run() {  # run KEY LIMIT_S NAME ARGS...
  local key=$1 limit=$2 name=$3
  shift 3
  [[ "$RUNS" == *",$key,"* ]] || return 0
  echo "=== $name (limit ${limit} s)"
  local start=$SECONDS
  PYTHONUNBUFFERED=1 timeout "$limit" python3 benchmarks/bench.py "${COMMON[@]}" "$@" --out "$RESULTS/$name.json" \
    | grep -v '^{'   # the table; the JSON line is in the file
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo ' (time limit: the JSON holds what was measured)')"
  [ "$rc" -eq 0 ] || status=1
}
run eager "${LIMIT_EAGER:-240}" "gpu_${S}_bf16_eager"
run compiled "${LIMIT_COMPILED:-480}" "gpu_${S}_bf16_compiled" --compile
run int8 "${LIMIT_INT8:-420}" "gpu_${S}_int8_compiled" --compile --quantize int8 --skip-hf
ls -l "$RESULTS"
exit $status
