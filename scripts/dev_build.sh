#!/usr/bin/env bash
# Developer build without pip: compiles the extension into BUILD_DIR and lays out an importable
# package at BUILD_DIR/pkg/fluxmini (links to python/fluxmini plus the built _core), so several
# builds can live side by side. Usage: scripts/dev_build.sh BUILD_DIR [PYTHON]
#   then: PYTHONPATH=BUILD_DIR/pkg python -m pytest tests
# FLUXMINI_SANITIZE=address,undefined scripts/dev_build.sh BUILD_DIR builds under sanitizers;
#   run Python against it with scripts/sanitized.sh (docs/FUZZING.md).
set -euo pipefail
build=${1:?usage: scripts/dev_build.sh BUILD_DIR [PYTHON]}
py=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
ggml_prefix=$("$py" -c 'import libggml, os; print(os.path.dirname(libggml.__file__))')
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$ggml_prefix" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v "$py")" -DFLUXMINI_SANITIZE="${FLUXMINI_SANITIZE:-}" >/dev/null
cmake --build "$build" -j 2
pkg="$build/pkg/fluxmini"
rm -rf "$pkg" && mkdir -p "$pkg"
for f in "$root"/python/fluxmini/*; do ln -s "$f" "$pkg/"; done
ln -s "$(ls "$build"/_core*.so | head -n1)" "$pkg/"
echo "built: PYTHONPATH=$build/pkg"
