#!/usr/bin/env bash
# Installs the adapter packages (adapters/*, each its own distribution) into ./.venv with their
# test extras, next to ctxcache (run scripts/setup.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -c adapters/constraints.txt)
"${PIP[@]}" -e "adapters/ctxcache-client[test]" -e "adapters/langchain-ctxcache[test]" \
  -e "adapters/llama-index-llms-ctxcache[test]"
# SGLang's storage interface only: the sglang wheel without its CUDA dependencies, plus the few
# pure-Python modules its interface imports.
"${PIP[@]}" --no-deps sglang pybase64 msgspec pyzmq ipython traitlets
"${PIP[@]}" --no-deps -e adapters/sglang-ctxcache
echo "adapters installed in .venv"
