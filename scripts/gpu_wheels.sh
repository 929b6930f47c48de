#!/usr/bin/env bash
# The Python packages the GPU training bench needs on a lent device machine, as wheels for its Python 3.12 on
# x86-64 (nothing can be fetched there). Two sets, because together they exceed what one call may carry (64 MiB
# with the repository): .whl/train (bitsandbytes, TRL, datasets, Liger, pydantic) and .whl/unsloth (Unsloth, with
# the TRL and datasets releases it pins). scripts/gpu_train_bench.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
rm -rf .whl/train .whl/unsloth
"${pip[@]}" -d .whl/train bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# Unsloth 2026.10.9 pins trl<=1.15 and datasets<5; they go into their own folder, ahead of .whl/train's on the path
"${pip[@]}" -d .whl/unsloth unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 tyro==1.0.17 \
    docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 cut-cross-entropy==25.1.1 msgspec==0.23.0 \
    hf-transfer==0.1.9 json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0 torchao==0.18.0 diffusers==0.42.1 \
    importlib-metadata certifi==2026.10.19.post1
du -sh .whl/train .whl/unsloth
