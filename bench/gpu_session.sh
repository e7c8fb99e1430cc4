#!/usr/bin/env bash
# One GPU machine's checks, in one call (a lent GPU's time is short): the Triton tests run natively,
# then `bench/gpu.py` on the three GPU shapes. Everything lands in OUT_DIR (default
# bench/results/gpu-session): env.txt (card, driver, versions), tests.log + tests.xml, bench.log and
# gpu.json (written after every shape, so a run cut short keeps what it measured).
#
# Runs under the machine's own python3 (PYTHON=... to choose), with no build step: SPARSEKIT_ISA=none
# loads no C++ extension (CPU ops run the reference), which the Triton path does not need; no install
# either (sparsekit/kernels is linked to kernels/sparsekit_kernels when missing).
# Stage limits: TEST_SECONDS (default 200) and BENCH_SECONDS (default 260); TEST_WORKERS (default 16)
# pytest-xdist workers, which compile Triton kernels in parallel.
set -u
out=${1:-bench/results/gpu-session}
py=${PYTHON:-python3}
mkdir -p "$out"
# Without an install, sparsekit.kernels (kernels/sparsekit_kernels, pyproject's package-dir) needs a link.
[ -e sparsekit/kernels ] || ln -s ../kernels/sparsekit_kernels sparsekit/kernels
export PYTHONUNBUFFERED=1 SPARSEKIT_ISA=none PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    $py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

started=$(date +%s)
# SIGINT at the limit: pytest then still prints which tests failed so far.
timeout -s INT -k 20 "${TEST_SECONDS:-200}" $py -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-16}" --durations=10 \
    -rfE --tb=short -p no:benchmark \
    --junitxml="$out/tests.xml" \
    tests/ops/test_triton_ops.py tests/ops/test_fuzz.py tests/ops/test_autograd_formulas.py \
    tests/ops/test_triton_bench.py ${TEST_ARGS:-} > "$out/tests.log" 2>&1
echo "tests: exit $? after $(( $(date +%s) - started )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | head -n 60

started=$(date +%s)
TRITON_PRINT_AUTOTUNING=1 timeout "${BENCH_SECONDS:-260}" $py bench/gpu.py --json "$out/gpu.json" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
echo "bench: exit $? after $(( $(date +%s) - started )) s"
grep -v -E "^(Autotuning kernel|with key as|finished after)" "$out/bench.log" | tail -n 60
