#!/usr/bin/env bash
# Creates .venv and installs quantship with its test and serving extras. Installs the CPU build of torch
# FIRST, pinned, so pip never pulls a multi-GB CUDA build to satisfy a dependency. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
