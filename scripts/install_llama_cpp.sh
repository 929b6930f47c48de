#!/usr/bin/env bash
# llama-cpp-python ships no wheel for this platform: build it once from the source package with
# portable CPU flags (AVX2/FMA/F16C, no -march=native so the wheel runs on any x86_64 CI machine),
# keep the wheel in .cache/wheels, and install from there on every later set-up.
set -euo pipefail
VERSION=0.3.36
PIP="${1:-.venv/bin/pip}"
WHEELS=.cache/wheels
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION (one-off, ~5-10 min on 2 cores)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PIP" wheel --no-deps -w "$WHEELS" "llama-cpp-python==$VERSION"
fi
# --prefer-binary takes the cached wheel over the registry's source package; dependencies and the
# server extra come from the registry as usual.
"$PIP" install --prefer-binary --find-links "$WHEELS" "llama-cpp-python[server]==$VERSION"
