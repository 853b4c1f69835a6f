#!/usr/bin/env bash
# Builds vit, makes bench/.venv with the pinned PyTorch/timm/ONNX Runtime (PyPI's torch wheel
# is the CUDA build: it will not import without the CUDA runtime wheels it depends on, about
# 3 GB, although only its CPU code runs here), and runs bench/compare.py with any arguments given,
# e.g. `bench/compare.sh --write docs/perf.md` to refresh the table there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
if ! bench/.venv/bin/python -c "import timm, onnxruntime, onnxscript" 2>/dev/null; then
  python3 -m venv bench/.venv
  pin() { grep "^$1==" tools/requirements.txt; }
  # torchvision and timm without their dependencies, so that they cannot move torch's pin.
  bench/.venv/bin/pip install -q "$(pin torch)"
  bench/.venv/bin/pip install -q --no-deps "$(pin torchvision)" "$(pin timm)"
  bench/.venv/bin/pip install -q "$(pin numpy)" "$(pin pillow)" "$(pin safetensors)" "$(pin huggingface_hub)" \
    "$(pin onnx)" "$(pin onnxruntime)" "$(pin onnxscript)" pyyaml filelock fsspec jinja2 networkx sympy typing-extensions
fi
exec bench/.venv/bin/python bench/compare.py "$@"
