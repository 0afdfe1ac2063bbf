#!/usr/bin/env bash
# Tests a built wheel the way a user gets it (README.md, "Building wheels"): installed into a fresh
# venv, on a PATH with no compiler and no CMake; `fluxmini demo` from an empty folder, then the
# README's test command against the installed package, never python/ (tests/conftest.py checks
# it: FLUXMINI_TEST_INSTALLED=1). The tests read parts of the repository (docs/, scripts/, fuzz/,
# the fuzz regression corpus), so they run from its root.
# Usage: scripts/test_wheel.sh WHEEL VENV [EXTRAS [PYTEST ARGS...]]
#   EXTRAS: the extras to install with the wheel (default test,reference,ray; "" for none)
#   PYTHON: the interpreter the venv is made from (default python3)
# The venv is left in place (.ci/run runs the fuzz smoke with it).
set -euo pipefail
wheel=$(cd "$(dirname "${1:?usage: scripts/test_wheel.sh WHEEL VENV [EXTRAS [PYTEST ARGS...]]}")" && pwd)/$(basename "$1")
venv=${2:?usage: scripts/test_wheel.sh WHEEL VENV [EXTRAS [PYTEST ARGS...]]}
extras=${3-test,reference,ray}
shift $(($# < 3 ? $# : 3))
root=$(cd "$(dirname "$0")/.." && pwd)

rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
venv=$(cd "$venv" && pwd)

# The PATH without compilers: every other program of the current PATH, linked into one folder.
nocc=$(mktemp -d /tmp/fluxmini-nocc.XXXXXX)
trap 'rm -rf "$nocc"' EXIT
IFS=: read -ra dirs <<< "$PATH"
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    n=${f##*/}
    case "$n" in
      cc|c++|cpp|gcc|g++|c89|c99|cmake|ctest|cpack|ccmake|ninja|clang|clang++|clang-[0-9]*|clang++-[0-9]*|\
      gcc-[0-9]*|g++-[0-9]*|*-linux-gnu-gcc*|*-linux-gnu-g++*|*-linux-gnu-cpp*|tcc|nvcc|zig) continue ;;
    esac
    if [ -x "$f" ] && [ ! -d "$f" ] && [ ! -e "$nocc/$n" ]; then ln -s "$f" "$nocc/$n"; fi
  done
done
export PATH="$venv/bin:$nocc"
for tool in cc c++ gcc g++ cmake clang clang++; do
  if command -v "$tool" >/dev/null; then
    echo "test_wheel.sh: $tool is still on PATH ($(command -v "$tool"))" >&2
    exit 1
  fi
done
echo "test_wheel.sh: no compiler on PATH (cc, c++, gcc, g++, cmake, clang, clang++: command -v finds none)"

python -m pip install -q --upgrade pip
python -m pip install -q "$wheel${extras:+[$extras]}"

work=$(mktemp -d /tmp/fluxmini-wheel-test.XXXXXX)
cd "$work"
python -c 'import fluxmini, fluxmini._core as c; print("fluxmini", fluxmini.__version__, "from", c.__file__)'
fluxmini demo -q -o "$work/demo.png"
cd / && rm -rf "$work"
# The test command of README.md ("Tests"), run from the repository root. `python -m` puts the
# root first on sys.path, and it holds no `fluxmini` (the sources are under python/), so the
# installed wheel is what the tests import; FLUXMINI_TEST_INSTALLED=1 makes conftest.py refuse any
# other fluxmini.
cd "$root"
FLUXMINI_TEST_INSTALLED=1 python -m pytest tests -q "$@"
