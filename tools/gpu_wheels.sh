#!/usr/bin/env bash
# Fill .whl/ with the wheels a lent GPU machine lacks (it has torch, numpy, Pillow, einops,
# accelerate, safetensors, PyYAML, scikit-learn, tqdm, psutil, msgpack, ninja, py-cpuinfo,
# nvidia-ml-py and typing-extensions, and no package index). Run here, from the repo root, once;
# then pass `.whl` in the device call's carry list and start it with `bash tools/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps -d .whl
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
# Pure-Python packages and the one binary one (pydantic-core) for the machine's CPython 3.12.
python3 -m pip download -q "${py[@]}" webdataset==1.0.2 braceexpand submitit==1.5.4 hjson \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection
# DeepSpeed ships as source only: build a pure-Python wheel (its CUDA ops are built on first
# use there, with the machine's nvcc and ninja, or not at all: the pipeline needs none of them).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -l .whl
