#!/usr/bin/env bash
# Download the wheels the GPU machine's image lacks into .whl/ (git-ignored), for the device run of
# docs/benchmarks.md ("The GPU run"). That image has Python 3.12 with torch, transformers, accelerate,
# huggingface-hub, safetensors, tokenizers, sentencepiece, numpy, pillow, pyyaml, httpx, anyio, h11, click, prometheus-client,
# psutil and tqdm; it has no diffusers, FastAPI (nor fastapi-offline, which /docs imports), python-multipart
# (the edits upload parser), Starlette, uvicorn, pydantic(-core, -settings) or torchao,
# and its peft / typing-extensions may be other versions than the ones the tests run. The versions below
# are those of the test environment (pydantic-core 2.50 needs typing-extensions >= 4.16; FastAPI imports
# opentelemetry-api). importlib-metadata is left out: diffusers imports the standard library's on 3.8+.
#
#   bash scripts/device_wheels.sh            # then carry .whl in the device run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=(
  diffusers==0.42.1
  peft==0.21.2
  torchao==0.18.0
  fastapi==0.165.0
  fastapi-offline==1.7.7
  python-multipart==0.0.34
  starlette==1.10.0
  uvicorn==0.54.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  pydantic-settings==2.16.3
  python-dotenv==1.2.4
  typing-inspection==0.4.5
  annotated-types==0.8.0
  annotated-doc==0.0.7
  typing-extensions==4.16.0
  opentelemetry-api==1.45.2
)
rm -rf .whl
mkdir -p .whl
# The device tool's own download command (its README): binary wheels for CPython 3.12 on x86-64 Linux, no dependencies resolved.
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  -d .whl "${WHEELS[@]}"
count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels, got $count" >&2
  exit 1
fi
du -ch .whl/*.whl | tail -1 | sed "s/total/in $count wheels (.whl\/)/"
