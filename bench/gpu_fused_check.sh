#!/usr/bin/env bash
# The fused TopK (kernels/sparsekit_kernels/fused_topk.py) on a lent GPU, in one call of about 4 minutes:
# its tests natively (and the Triton TopK tests of test_triton_ops.py, which now run it by default), then
# bench/gpu.py's TopK rows (--topk-only: the default design, fused with the screen off, unfused) at
# B=8192 d=2048 n=131072 k=64 and B=4096 d=768 n=32768 k=32, bf16 and fp32, then the roofline table
# with those times beside the H200 bounds. Everything lands in OUT_DIR (default
# bench/results/gpu-fused-check): env.txt, tests.log, bench.log, gpu.json (written after every shape
# and dtype, so a run cut short keeps what it measured), predict.txt.
#
# Run from the repository root with the machine's own python3 (PYTHON=... to choose), no build, no
# install (as bench/gpu_session.sh): SPARSEKIT_ISA=none loads no C++ extension, and sparsekit/kernels
# is linked to kernels/sparsekit_kernels when missing. Stage limits: TEST_SECONDS (default 60),
# BENCH_SECONDS (default 170); TEST_WORKERS (default 8) pytest-xdist workers when xdist is there.
set -u
out=${1:-bench/results/gpu-fused-check}
py=${PYTHON:-python3}
shapes=${SHAPES:-8192:2048:131072:64,4096:768:32768:32}
mkdir -p "$out"
[ -e sparsekit/kernels ] || ln -s ../kernels/sparsekit_kernels sparsekit/kernels
export PYTHONUNBUFFERED=1 SPARSEKIT_ISA=none PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

workers=""
$py -c "import xdist" 2>/dev/null && workers="-n ${TEST_WORKERS:-8}"
started=$(date +%s)
timeout -s INT -k 10 "${TEST_SECONDS:-60}" $py -m pytest -q -p no:cacheprovider $workers -rfE --tb=short \
    -p no:benchmark -k topk tests/ops/test_triton_fused_topk.py tests/ops/test_triton_ops.py > "$out/tests.log" 2>&1
echo "tests: exit $? after $(( $(date +%s) - started )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | head -n 30

started=$(date +%s)
timeout "${BENCH_SECONDS:-170}" $py bench/gpu.py --topk-only --shapes "$shapes" --dtypes bf16,fp32 --repeats 3 \
    --json "$out/gpu.json" > "$out/bench.log" 2>&1
echo "bench: exit $? after $(( $(date +%s) - started )) s"
tail -n 30 "$out/bench.log"

if [ -s "$out/gpu.json" ]; then
    $py bench/gpu.py --predict --card h200 --shapes "$shapes" --dtypes bf16,fp32 --measured "$out/gpu.json" \
        > "$out/predict.txt" 2>&1
    grep -E "^(kernel|= )" "$out/predict.txt" | cut -c1-220
fi
