#!/usr/bin/env bash
# Fetch, here (with package-registry access), the wheels the device image lacks for the GPU
# suite, into .whl/ at the repository root (git-ignored through .git/info/exclude, carried
# with `carry=[".whl"]`). The image (KINDS.md of the device tool) has Python 3.12, torch 2.11,
# triton 3.6, transformers, accelerate, safetensors 0.8, huggingface_hub 1.33, but no diffusers;
# diffusers needs importlib_metadata, which it lacks too. natten ships only an sdist (no
# wheel to carry): the suite records it as absent and checks GNA against the exact reference.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-10.2.0}"
ls -l .whl
