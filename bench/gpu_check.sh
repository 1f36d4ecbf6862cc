#!/usr/bin/env bash
# Device check of the kernels and the compiled decode step on one CUDA GPU, in at most ~12 minutes:
#   1. the compiled-kernel tests (tests/test_kernels_*.py -k cuda): sparse attention (bf16 / FP8 rows),
#      compressor step (CSA / HCA, FP8 KV and FP8 / FP4 index rows), radix top-k, the FP8 block-scaled GEMM
#      and the MXFP4 grouped expert GEMM (bf16 / fp32 activations), at Flash shapes;
#   2. `dsv4 bench kernels`: decode GB/s and % of HBM peak at 8K / 128K / 1M context, batch 1 / 32, and the
#      two GEMMs at 1 / 32 / 2048 tokens (GB/s and TFLOP/s), Triton and the torch reference side by side;
#   3. the compiled decode step (`--compile on`: torch.compile + CUDA graphs, decode batches padded to buckets):
#      `dsv4 bench scaling --device cuda --compile both` at 1K context, batch 1 / 16, eager vs compiled,
#      and the compiled-decode numerics test on CUDA (tokens and logprobs vs eager).
# Outputs go to $OUT (the device runner's folder) or bench/results: gpu.txt, kernel_tests.txt,
# bench_kernels.txt, kernels_cuda.{json,md}, compiled_decode.txt, scaling_cuda.{json,md}. Exit status: non-zero
# if any step failed.
#
# Usage:  bash bench/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
# Needs torch with CUDA, triton, numpy and pytest (the device image has them; nothing is fetched). When
# `dsv4` is not importable it is put on PYTHONPATH as a tree of links to this checkout's folders, the same
# mapping setup.py declares (no pip, so it works offline).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET DSV4_KERNEL_BACKEND

if ! "$PY" -c "import dsv4.kernels" 2>/dev/null; then
  tree=$(mktemp -d)
  # setup.py's ROOTS ({"dsv4": "dsv4", "dsv4.runtime": "runtime", ...}) read, not repeated here
  "$PY" - "$tree" <<'PYEOF' || { echo "cannot map the checkout's folders onto dsv4"; exit 2; }
import ast, os, sys
tree = sys.argv[1]
mod = ast.parse(open("setup.py").read())
roots = next(ast.literal_eval(n.value) for n in mod.body
             if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ROOTS")
for name, folder in roots.items():
    dest = os.path.join(tree, *name.split("."))
    if name == "dsv4":
        os.makedirs(dest)
        for f in os.listdir(folder):
            if f.endswith(".py"):
                os.symlink(os.path.abspath(os.path.join(folder, f)), os.path.join(dest, f))
    else:
        os.symlink(os.path.abspath(folder), dest)
PYEOF
  export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import dsv4.kernels, dsv4.bench.kernels" || { echo "cannot import dsv4 from $tree"; exit 2; }
fi
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee "$OUT_DIR/gpu.txt" || exit 2
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv >> "$OUT_DIR/gpu.txt" 2>&1 || true

start=$(date +%s)
timeout 200 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda \
  tests/test_kernels_triton.py tests/test_kernels_compressor.py tests/test_kernels_topk.py \
  tests/test_kernels_quant_gemm.py \
  2>&1 | tee "$OUT_DIR/kernel_tests.txt"
rc_tests=${PIPESTATUS[0]}
echo "kernel tests: rc=$rc_tests in $(( $(date +%s) - start )) s"

start=$(date +%s)
timeout 260 "$PY" -m dsv4.cli bench kernels --device cuda --reps 10 --out "$OUT_DIR" \
  2>&1 | tee "$OUT_DIR/bench_kernels.txt"
rc_bench=${PIPESTATUS[0]}
echo "bench kernels: rc=$rc_bench in $(( $(date +%s) - start )) s"

start=$(date +%s)
{ timeout 90 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_compiled_decode.py &&
  timeout 120 "$PY" -m dsv4.cli bench scaling --device cuda --no-reference --compile both --contexts 1K \
    --batches 1,16 --out "$OUT_DIR"; } 2>&1 | tee "$OUT_DIR/compiled_decode.txt"
rc_compiled=${PIPESTATUS[0]}
echo "compiled decode step: rc=$rc_compiled in $(( $(date +%s) - start )) s"

[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_compiled" -eq 0 ]
