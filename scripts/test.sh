#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite (CPU only, real components).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test qwen05b
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q tests "$@"
