#!/usr/bin/env bash
# Builds vit, makes bench/.venv with the pinned PyTorch/timm (CPU use only; the CUDA wheels
# are skipped with --no-deps), and runs bench/compare.py with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  pin() { grep "^$1==" tools/requirements.txt; }
  # torch's own requirements name the CUDA wheels: install it (and what pins it) without them.
  bench/.venv/bin/pip install -q --no-deps "$(pin torch)" "$(pin torchvision)" "$(pin timm)"
  bench/.venv/bin/pip install -q "$(pin numpy)" "$(pin pillow)" "$(pin safetensors)" "$(pin huggingface_hub)" \
    pyyaml filelock fsspec jinja2 networkx sympy typing-extensions
fi
exec bench/.venv/bin/python bench/compare.py "$@"
