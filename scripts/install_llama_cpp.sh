#!/usr/bin/env bash
# llama-cpp-python ships no wheel for this platform: build it once from the source package with
# portable CPU flags (AVX2/FMA/F16C, no -march=native so the wheel runs on any x86_64 CI machine),
# keep the wheel in .cache/wheels, and install from there on every later set-up.
# The native llama-server (what people serve GGUFs with) is built once from the llama.cpp sources that
# the same source package vendors, kept in .cache/llama-server and copied beside the venv's python.
set -euo pipefail
VERSION=0.3.36
PIP="${1:-.venv/bin/pip}"
BIN="$(dirname "$PIP")"
WHEELS=.cache/wheels
SERVER=".cache/llama-server/$VERSION/llama-server"
PORTABLE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION (one-off, ~5-10 min on 2 cores)"
    CMAKE_ARGS="$PORTABLE_FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PIP" wheel --no-deps -w "$WHEELS" "llama-cpp-python==$VERSION"
fi
# --prefer-binary takes the cached wheel over the registry's source package; dependencies come from
# the registry as usual. Serving uses the native llama-server below, not the Python server extra.
"$PIP" install --prefer-binary --find-links "$WHEELS" "llama-cpp-python==$VERSION"

if [ ! -x "$SERVER" ]; then
    echo "building llama-server from llama-cpp-python $VERSION's vendored llama.cpp (one-off, ~4 min on 2 cores)"
    # The wheel's build took CMake from the registry in its own isolated environment; this one needs its own.
    CMAKE="$(command -v cmake || true)"
    if [ -z "$CMAKE" ]; then "$PIP" install --quiet cmake; CMAKE="$BIN/cmake"; fi
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$PIP" download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION"
    tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    # No web UI download, no OpenSSL: a loopback OpenAI-compatible server is all we need.
    "$CMAKE" -S "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF $PORTABLE_FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF >"$work/cmake.log"
    "$CMAKE" --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" \
        || { tail -20 "$work/build.log"; exit 1; }
    mkdir -p "$(dirname "$SERVER")"
    cp "$work/build/bin/llama-server" "$SERVER.partial" && mv "$SERVER.partial" "$SERVER"
fi
cp "$SERVER" "$BIN/llama-server"
