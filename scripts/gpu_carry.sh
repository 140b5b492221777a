#!/usr/bin/env bash
# Builds .gpucarry/: the wheels the lent GPU machine lacks for quantship's GPU tests and benches (it has Python
# 3.12, torch 2.11, transformers, safetensors, huggingface_hub, numpy, triton; no network). Pass the folder in the
# device tool's `carry` and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpucarry/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD;
# then e.g. `python3 -m pytest -q -m gpu tests/` or `python3 bench/decode_speed.py --device cuda ...`.
#
# The packages are what quantship and its serve tests import beyond the machine's own; pip resolves their
# requirements for cp312 manylinux (none of them pulls torch; about 10 MB, with typing_extensions and packaging
# newer than the machine's). The openai client's transport is httpx2 since openai 3.x, and fastapi 0.16x needs
# annotated_doc: a hand-picked list missed both and the serve test modules were not collected there. Checked by
# importing every package from the folder alone under a clean Python 3.12.
set -euo pipefail
out="${1:-.gpucarry}"
mkdir -p "$out"
pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$out" \
  pydantic click rich pyyaml fastapi uvicorn sse-starlette prometheus-client openai httpx pytest
du -sh "$out"
