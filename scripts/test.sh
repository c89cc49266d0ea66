#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite (CPU only, real components):
# ctxcache's tests (examples included), then each adapter package's own tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test qwen05b
bash scripts/setup_adapters.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q tests "$@"
for pkg in ctxcache-client langchain-ctxcache llama-index-llms-ctxcache sglang-ctxcache; do
  echo "== adapters/$pkg"
  (cd "adapters/$pkg" && ../../.venv/bin/python -m pytest -q -p no:cacheprovider tests)
done
