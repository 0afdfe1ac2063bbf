#!/usr/bin/env bash
# fluxmini on arm64 (aarch64) under emulation, from an x86-64 Debian/Ubuntu host, as root
# (README.md, "Building wheels"). Emulation says nothing about speed: this checks that the code
# builds and is correct on arm64, that our x86 kernels are never selected there (ggml's NEON
# kernels run) and that nothing depends on x86 alignment rules.
#
# Usage: scripts/arm64_check.sh [short|full]          (default short)
#   1. host: Debian's qemu-user-static, binfmt-support and debootstrap; binfmt_misc mounted and the
#      qemu-aarch64 entry enabled (its F flag: the chroot needs no copy of the emulator).
#   2. a Debian 12 (bookworm) arm64 userland in ARM64_ROOT (default /opt/arm64-root): debootstrap
#      with python3, venv, the Python headers and g++; CMake and Ninja come from PyPI at build time.
#   3. inside it: this working tree is copied to /src/fluxmini and scripts/build_wheel.sh builds the
#      wheel (numpy, libggml-python, scikit-build-core, pybind11, cmake: PyPI's aarch64 wheels) and
#      repairs it to a manylinux aarch64 tag; the wheel goes into a fresh venv (with the test extra,
#      and the reference extra, torch included, for `full`), then `fluxmini demo`, `fluxmini info`
#      on a tiny Q4_0 model (must say "matmul: ggml", never an x86 path) and, from outside the
#      source tree with FLUXMINI_TEST_INSTALLED=1, the tests:
#      short: tokenizers, loader, and the committed-golden parity test of each network
#             (CLIP, T5, transformer, VAE) and of the whole pipeline;
#      full:  short, plus our portable kernels against ggml's (test_cpu_qmatmul.py,
#             test_cpu_conv.py), and the live torch parity tests of each network.
# Idempotent: a finished userland (ARM64_ROOT/.fluxmini-bootstrap-ok) and the CMake build folder
# of the copied tree are kept; the source copy, the wheel and the test venv are made anew.
# ARM64_MIRROR overrides the Debian mirror (default: the first one in /etc/apt/sources.list*).
# The wheel ends up in ARM64_ROOT/src/dist/.
#
# Durations (2 shared cores of a Xeon Sapphire Rapids host, qemu 7.2 user mode, under nice -n 15
# with other builds running): see README.md, "Building wheels".
set -euo pipefail
mode=${1:-short}
case "$mode" in short|full) ;; *) echo "usage: scripts/arm64_check.sh [short|full]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
arm=${ARM64_ROOT:-/opt/arm64-root}
t_start=$SECONDS
stamp() { echo "arm64_check: [$((SECONDS - t_start)) s] $*"; }

# 1. host tools and binfmt_misc
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || {
    echo "arm64_check: cannot mount binfmt_misc (a container without CAP_SYS_ADMIN?): aarch64 programs cannot run" >&2
    exit 1
  }
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  echo "arm64_check: the qemu-aarch64 binfmt entry is not enabled" >&2
  exit 1
fi
stamp "binfmt: $(sed -n 2p /proc/sys/fs/binfmt_misc/qemu-aarch64), $(/usr/bin/qemu-aarch64-static --version | head -1)"

# 2. the arm64 userland
if [ ! -e "$arm/.fluxmini-bootstrap-ok" ]; then
  mirror=${ARM64_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
                           | awk '/^(URIs:|deb) +https?:/ && !/security/ {print $2; exit}' || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  stamp "debootstrap arm64 bookworm from $mirror into $arm"
  rm -rf "$arm"
  # first stage (download and unpack: little CPU), then the second under emulation, niced
  debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-dev,g++,ca-certificates bookworm "$arm" "$mirror" >"$arm.debootstrap.log" 2>&1 || {
      tail -20 "$arm.debootstrap.log" >&2; exit 1; }
  stamp "first stage done"
  nice -n 15 chroot "$arm" /debootstrap/debootstrap --second-stage >>"$arm.debootstrap.log" 2>&1 || {
      tail -20 "$arm.debootstrap.log" >&2; exit 1; }
  touch "$arm/.fluxmini-bootstrap-ok"
  stamp "userland ready"
fi

# 3. the check inside the userland
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" || true; done
}
trap cleanup EXIT
bind() {  # bind SRC DEST_IN_ROOT (once)
  mkdir -p "$arm$2"
  if ! mountpoint -q "$arm$2"; then mount --bind "$1" "$arm$2" && mounted+=("$arm$2"); fi
}
if ! mountpoint -q "$arm/proc"; then mount -t proc proc "$arm/proc" && mounted+=("$arm/proc"); fi
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
bind /dev/shm /dev/shm
cp /etc/resolv.conf "$arm/etc/resolv.conf"
# pip inside trusts what the host trusts: a host behind a TLS-inspecting proxy has that proxy's CA
# in its own bundle only (the userland's ca-certificates would fail with CERTIFICATE_VERIFY_FAILED)
host_ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
ca_env=()
if [ -r "$host_ca" ]; then
  cp "$host_ca" "$arm/etc/ssl/certs/host-ca-bundle.crt"
  ca_env=(SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt
          REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt)
fi
# a package index the host is told to use (not a file:// one: the userland cannot see it)
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  case "${!v:-}" in ''|file:*) ;; *) ca_env+=("$v=${!v}") ;; esac
done

# the working tree (tracked and untracked files git does not ignore); the CMake folder build/ stays
src="$arm/src/fluxmini"
mkdir -p "$src"
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git -C "$root" ls-files -z -co --exclude-standard | tar -C "$root" --null --ignore-failed-read -T - -cf - 2>/dev/null \
  | tar -C "$src" -xf -
stamp "source copied to $src"

cat >"$arm/src/arm64_inside.sh" <<'INSIDE'
set -euo pipefail
t0=$SECONDS
stamp() { echo "arm64_check (inside, $(uname -m)): [$((SECONDS - t0)) s] $*"; }
stamp "$(python3 --version), $(g++ --version | head -1), $(ldd --version | head -1)"

cd /src/fluxmini
FLUXMINI_WHEEL_FROM_TREE=1 scripts/build_wheel.sh /src/dist python3
wheel=$(ls /src/dist/fluxmini-*.whl)
stamp "wheel built: $wheel"

venv=/opt/fluxmini-test-venv
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
extras=test
[ "$MODE" = full ] && extras=test,reference
"$venv/bin/python" -m pip install -q "$wheel[$extras]"
stamp "installed with [$extras]"

work=$(mktemp -d)
cd "$work"
"$venv/bin/fluxmini" demo -q -o demo.png
stamp "fluxmini demo done"
"$venv/bin/fluxmini" make-random --tiny --variant Q4_0 -q -o tiny-q4_0.gguf >/dev/null
info=$("$venv/bin/fluxmini" info tiny-q4_0.gguf)
echo "$info" | grep -E "^kernels:"
echo "$info" | grep -qE "^kernels: matmul: ggml" || { echo "arm64_check: expected ggml's matmul on arm64" >&2; exit 1; }
if echo "$info" | grep -qE "AVX|fluxmini \("; then echo "arm64_check: an x86 kernel was selected" >&2; exit 1; fi
"$venv/bin/python" -c "from fluxmini import _core; t = _core.testing
assert t.qmatmul_paths() == ['portable'], t.qmatmul_paths()
assert not t.cpu_conv2d_available()
print('dispatch: quantized matmul paths', t.qmatmul_paths(), '(engine: ggml); VAE convolution: ggml')"

tests=/src/fluxmini/tests
sel=("$tests/test_tokenizers.py" "$tests/test_loader.py"
     "$tests/test_text_encoders.py::test_clip_goldens" "$tests/test_text_encoders.py::test_t5_goldens"
     "$tests/test_flux.py::test_goldens" "$tests/test_vae.py::test_goldens" "$tests/test_pipeline.py::test_end_to_end_against_goldens")
if [ "$MODE" = full ]; then
  sel+=("$tests/test_cpu_qmatmul.py" "$tests/test_cpu_conv.py"
        "$tests/test_text_encoders.py::test_clip_live" "$tests/test_flux.py::test_live_parity"
        "$tests/test_vae.py::test_live_parity")
fi
FLUXMINI_TEST_INSTALLED=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${sel[@]}"
stamp "tests done ($MODE)"
INSIDE
chroot "$arm" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb MODE="$mode" "${ca_env[@]}" \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  nice -n 15 /bin/bash /src/arm64_inside.sh </dev/null
stamp "done ($mode)"
