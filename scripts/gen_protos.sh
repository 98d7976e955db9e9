#!/usr/bin/env bash
# Regenerates the Python gRPC stubs in protos/apar/v1/ from apar.proto (they are committed;
# tests/test_cluster_config.py checks that they match a fresh generation).
set -euo pipefail
cd "$(dirname "$0")/.."
${PYTHON:-python3} -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/apar/v1/apar.proto
