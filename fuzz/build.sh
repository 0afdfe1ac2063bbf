#!/usr/bin/env bash
# Builds the libFuzzer harnesses of fuzz/fuzz_weights.cpp with clang under ASan+UBSan into OUT_DIR
# (default /tmp/fluxmini-fuzz/bin). Needs clang with its libFuzzer runtime; on Debian 12:
#   apt-get install -y clang libclang-rt-14-dev
# Usage: fuzz/build.sh [OUT_DIR] [PYTHON]   (PYTHON finds the pinned libggml-python for ggml)
set -euo pipefail
out=${1:-/tmp/fluxmini-fuzz/bin}
py=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
cxx=${CXX_FUZZ:-$(command -v clang++ || command -v clang++-14 || true)}
if [ -z "$cxx" ]; then
  echo "fuzz/build.sh: clang++ not found (apt-get install -y clang libclang-rt-14-dev)" >&2
  exit 2
fi
ggml=$("$py" -c 'import libggml, os; print(os.path.dirname(libggml.__file__))')
libdir="$ggml/lib64"; [ -d "$libdir" ] || libdir="$ggml/lib"
mkdir -p "$out/generated"
# the loader's name table, generated the way CMakeLists.txt does (configure_file of names_table.h.in)
"$py" - "$root/csrc/names_table.h.in" "$root/python/fluxmini/data/names.txt" "$out/generated/names_table.h" <<'PY'
import sys
template, names, dest = sys.argv[1:]
text = open(template).read().replace("@FLUXMINI_NAMES_TEXT@", open(names).read())
open(dest, "w").write(text)
PY
flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -I"$root/csrc" -I"$out/generated" -I"$ggml/include")
srcs=("$root/fuzz/fuzz_weights.cpp" "$root/csrc/weights.cpp" "$root/csrc/common.cpp" "$root/csrc/options.cpp")
i=0
for name in fuzz_gguf_bytes fuzz_gguf_struct fuzz_safetensors; do
  "$cxx" "${flags[@]}" -DFUZZ_MODE=$i "${srcs[@]}" -L"$libdir" -lggml-base -Wl,-rpath,"$libdir" -o "$out/$name" &
  i=$((i + 1))
  # two compilers at a time at most (the machine is shared)
  if [ $i -eq 2 ]; then wait -n; fi
done
wait
echo "built: $out/{fuzz_gguf_bytes,fuzz_gguf_struct,fuzz_safetensors}"
