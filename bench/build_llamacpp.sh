#!/usr/bin/env bash
# The llama.cpp peer for the benchmarks: llama.cpp as the llama-cpp-python sdist vendors it, built
# with each AVX/AVX-512/VNNI/BF16 option on where this CPU lists its flag in /proc/cpuinfo, and
# ggml's AMX options off (its AMX path dies with an invalid opcode on these VMs; see
# ../shared/notes/offline-assets.md). AVX-VNNI in particular is not on every machine of this kind:
# an AMD EPYC with AVX-512 VNNI but no AVX-VNNI died on it with SIGILL. About 6 minutes on 2 cores;
# the binaries land in bench/.peers/llama.cpp/build/bin (llama-bench, llama-server, ...), rebuilt
# when the options this CPU gives differ from those they were built with.
set -euo pipefail
cd "$(dirname "$0")"
PEERS=.peers
VERSION=0.3.36
SRC=$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp
BIN=$PEERS/llama.cpp/build/bin
FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
OPTIONS="-DGGML_NATIVE=OFF"
for pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c AVX512:avx512f AVX512_VBMI:avx512vbmi \
            AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16 AVX_VNNI:avx_vnni; do
  case "$FLAGS" in *" ${pair#*:} "*) on=ON ;; *) on=OFF ;; esac
  OPTIONS="$OPTIONS -DGGML_${pair%%:*}=$on"
done
STAMP=$PEERS/llama.cpp/build/options
[ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] && [ "$(cat $STAMP 2>/dev/null)" = "$OPTIONS" ] && { echo "$BIN"; exit 0; }
mkdir -p $PEERS
if [ ! -d "$SRC" ]; then
  ../.venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d $PEERS
  tar -xzf $PEERS/llama_cpp_python-$VERSION.tar.gz -C $PEERS
fi
# shellcheck disable=SC2086  # OPTIONS is a list of words
cmake -S "$SRC" -B $PEERS/llama.cpp/build -DCMAKE_BUILD_TYPE=Release $OPTIONS \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF > /dev/null
cmake --build $PEERS/llama.cpp/build -j 2 --target llama-bench llama-batched-bench llama-quantize llama-server > /dev/null
echo "$OPTIONS" > $STAMP
echo "$BIN"
