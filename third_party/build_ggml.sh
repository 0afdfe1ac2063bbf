#!/usr/bin/env bash
# Build glue: compile ggml (the exact version fluxmini pins) with a chosen backend and install it,
# for `FLUXMINI_GGML_PREFIX=PREFIX pip install .`. No ggml code lives in this repository: the
# sources come from the libggml-python sdist on PyPI (or pass an unpacked sdist/ggml tree).
#
# usage: third_party/build_ggml.sh cuda|metal|native|cpu PREFIX [SOURCE_DIR] [-- extra cmake args]
#   e.g. third_party/build_ggml.sh cuda $HOME/ggml-cuda -- -DCMAKE_CUDA_ARCHITECTURES=86
set -euo pipefail
backend=${1:?backend: cuda, metal, native or cpu}
prefix=${2:?install prefix}
shift 2
src=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then src=$1; shift; fi
[ "${1:-}" = "--" ] && shift
version=0.20.2.post1

if [ -z "$src" ]; then
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=libggml-python "libggml-python==$version" -d "$work"
  tar xzf "$work"/libggml_python-$version.tar.gz -C "$work"
  src="$work/libggml_python-$version/ggml"
elif [ -f "$src" ]; then
  work=$(mktemp -d)
  tar xzf "$src" -C "$work"
  src="$work/libggml_python-$version/ggml"
fi

case "$backend" in
  cuda)   flags=(-DGGML_CUDA=ON) ;;
  metal)  flags=(-DGGML_METAL=ON) ;;
  native) flags=(-DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON) ;;
  cpu)    flags=() ;;
  *) echo "unknown backend $backend" >&2; exit 2 ;;
esac
build="${BUILD_DIR:-$src/build-$backend}"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF "${flags[@]}" "$@"
cmake --build "$build" -j "$(nproc)"
cmake --install "$build"
echo "ggml installed in $prefix; now: FLUXMINI_GGML_PREFIX=$prefix pip install ."
