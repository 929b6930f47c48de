#!/usr/bin/env bash
# llama-cpp-python ships no wheel for this platform, and serving needs the native llama-server too. Both
# come from ONE compile of the llama.cpp sources that llama-cpp-python's source package vendors:
#  1. CMake builds llama.cpp as shared libraries (libllama, libggml*, libmtmd, libllama-common: what the
#     Python bindings load with ctypes from site-packages/llama_cpp/lib) plus llama-server, which links
#     those same libraries. Portable CPU flags (AVX2/FMA/F16C, no -march=native) so it runs on any x86_64
#     CI machine; no web UI, no OpenSSL: a loopback OpenAI-compatible server is all we need.
#  2. The same source package is then turned into a wheel with LLAMA_BUILD=OFF (its own CMake step
#     compiles nothing); a one-line CMake include ships step 1's libraries and llama-server in
#     llama_cpp/lib. All carry RPATH $ORIGIN, so they find each other wherever that folder is.
# The wheel is kept in .cache/llama-cpp-python/VERSION, so every later set-up installs from it and
# compiles nothing. .venv/bin/llama-server is a symlink into site-packages: $ORIGIN follows the link.
set -euo pipefail
VERSION=0.3.36
PIP="${1:-.venv/bin/pip}"
BIN="$(dirname "$PIP")"
# A folder of its own: wheels built by the old two-build script (.cache/wheels) have no llama-server.
CACHE=".cache/llama-cpp-python/$VERSION"
PORTABLE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
wheel() { ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1; }
if [ -z "$(wheel)" ]; then
    echo "building llama.cpp + llama-server from llama-cpp-python $VERSION (one-off, ~20 min on 2 cores)"
    CMAKE="$(command -v cmake || true)"
    if [ -z "$CMAKE" ]; then "$PIP" install --quiet cmake; CMAKE="$BIN/cmake"; fi
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$PIP" download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION"
    tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    src="$work/llama_cpp_python-$VERSION"
    # BUILD_WITH_INSTALL_RPATH: $ORIGIN from the start, so no build-tree path is baked in.
    # NO_VERSIONED_SONAME: one file per library (libllama.so, the name ctypes opens), not three copies.
    "$CMAKE" -S "$src/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
        -DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON \
        $PORTABLE_FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF >"$work/cmake.log"
    # llama-server depends on every library the bindings load (ggml*, llama, llama-common, mtmd).
    "$CMAKE" --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" \
        || { tail -20 "$work/build.log"; exit 1; }
    mkdir "$work/lib"
    cp "$work"/build/bin/lib*.so "$work/build/bin/llama-server" "$work/lib/"
    printf 'install(DIRECTORY "%s/" DESTINATION "${SKBUILD_PLATLIB_DIR}/llama_cpp/lib" USE_SOURCE_PERMISSIONS)\n' \
        "$work/lib" >"$work/ship.cmake"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE=$work/ship.cmake" \
        "$PIP" wheel --quiet --no-cache-dir --no-deps -w "$work/dist" "$src"
    mkdir -p "$CACHE"
    whl="$(ls "$work"/dist/*.whl)"
    cp "$whl" "$CACHE/.partial" && mv "$CACHE/.partial" "$CACHE/$(basename "$whl")"
fi
# The wheel file itself, not --find-links: if it were missing, pip would quietly build the registry's
# source package (-march=native, no llama-server). Dependencies come from the registry as usual.
"$PIP" install "$(wheel)"
# A venv set up by the old script already holds 0.3.36 without llama-server; pip keeps it as satisfied.
server="$("$BIN/python" -c 'import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("llama_cpp").origin).parent / "lib" / "llama-server")')"
if [ ! -x "$server" ]; then "$PIP" install --force-reinstall --no-deps "$(wheel)"; fi
ln -sfn "$server" "$BIN/llama-server"
