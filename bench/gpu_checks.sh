#!/usr/bin/env bash
# The checks only a real GPU can do, in one short run (docs/kernels.md, "On a real GPU"):
#   1. the CUDA tests on the device (SPARSEFLASH_REAL_CUDA=1: numba.cuda compiles for the GPU, no simulator);
#   2. one streamed run with --device cuda --stats (the per-token timeline), and its text next to the CPU's;
#      and a cProfile of that run (profile_cuda.txt: where the host's time goes);
#   3. bench_stream: in-memory dense vs streamed cpu vs streamed cuda on the bundled model;
#   4. bench_kernels: the sparse FFN kernels on cpu and cuda next to dense torch on each device.
#
#   bench/gpu_checks.sh OUTDIR [SECONDS_SCALE]     (SPARSEFLASH_LAYOUT=FILE: that layout, not the bundled one)
#
# Every step has its own time limit (scaled by SECONDS_SCALE, default 1), and every output goes to
# OUTDIR as it is written, so a run stopped early still leaves what it measured. Run it from the
# repository root with the package importable (installed, or PYTHONPATH=.).
set -u
out=${1:?usage: bench/gpu_checks.sh OUTDIR [SECONDS_SCALE]}
scale=${2:-1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SPARSEFLASH_REAL_CUDA=1
py=${PYTHON:-python3}
limit() { echo $(( $1 * scale )); }
step() { echo "=== $(date -u +%T) $*" | tee -a "$out/steps.log"; }

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  $py -c "import sys, torch, numba, numpy; from numba import cuda; print(sys.version.split()[0], 'torch', torch.__version__, \
'numba', numba.__version__, 'numpy', numpy.__version__, 'cuda available', cuda.is_available(), 'torch sees', \
torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$out/steps.log"

step tests
timeout "$(limit 170)" $py -m pytest -q -rs -p no:cacheprovider -p no:warnings tests/test_kernels_cuda.py \
  tests/test_runtime_cuda.py "tests/test_plugins_run.py::test_streamed_on_the_device_with_a_plugin_agrees_with_dense" \
  2>&1 | tee -a "$out/steps.log"
echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$out/steps.log"

layout=${SPARSEFLASH_LAYOUT:-$($py -c "from sparseflash.layout.pipeline import prepare_bundled; print(prepare_bundled(quiet=True))")}
step "one streamed run each way (layout $layout)"
common=(-p "The os module provides" -n 48 --greedy --ignore-eos --json)
timeout "$(limit 40)" $py -m sparseflash.tools.cli run -m "$layout" --budget 25%ffn --device cuda --stats "$out/stats_cuda.json" "${common[@]}" \
  >"$out/run_cuda.json" 2>>"$out/runs.err"
echo "run cuda exit $?" | tee -a "$out/steps.log"
timeout "$(limit 30)" $py -m sparseflash.tools.cli run "${common[@]}" >"$out/run_dense.json" 2>>"$out/runs.err"
echo "run dense exit $?" | tee -a "$out/steps.log"

step "profile of the streamed cuda run"
timeout "$(limit 40)" $py -m cProfile -o /tmp/cuda.prof -m sparseflash.tools.cli run -m "$layout" --budget 25%ffn \
  --device cuda -p "The os module provides" -n 48 --greedy --ignore-eos >/dev/null 2>>"$out/runs.err" &&
  $py -c "import pstats; pstats.Stats('/tmp/cuda.prof').sort_stats('tottime').print_stats(45)" >"$out/profile_cuda.txt"

step bench_stream
timeout "$(limit 110)" $py bench/bench_stream.py --layout "$layout" -n 64 --budgets 25%ffn,100%ffn --devices cpu,cuda --repeat 2 \
  2>&1 | tee "$out/bench_stream.txt"

step bench_kernels
timeout "$(limit 70)" $py bench/bench_kernels.py --shapes 7b --dtype f16 q8 q4 --backends cpu cuda --repeats 15 \
  2>&1 | grep -v "^bench:" | tee "$out/bench_kernels.txt"
step done
