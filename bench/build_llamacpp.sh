#!/usr/bin/env bash
# The llama.cpp peer for the benchmarks: llama.cpp as the llama-cpp-python sdist vendors it, built
# for this CPU kind with the AVX-512/VNNI/BF16 options on and ggml's AMX options off (its AMX path
# dies with an invalid opcode on these VMs; see ../shared/notes/offline-assets.md). About 6 minutes
# on 2 cores; the binaries land in bench/.peers/llama.cpp/build/bin (llama-bench, llama-server, ...).
set -euo pipefail
cd "$(dirname "$0")"
PEERS=.peers
VERSION=0.3.36
SRC=$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp
BIN=$PEERS/llama.cpp/build/bin
[ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] && { echo "$BIN"; exit 0; }
mkdir -p $PEERS
if [ ! -d "$SRC" ]; then
  ../.venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d $PEERS
  tar -xzf $PEERS/llama_cpp_python-$VERSION.tar.gz -C $PEERS
fi
cmake -S "$SRC" -B $PEERS/llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
  -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF > /dev/null
cmake --build $PEERS/llama.cpp/build -j 2 --target llama-bench llama-batched-bench llama-quantize llama-server > /dev/null
echo "$BIN"
