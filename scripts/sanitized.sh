#!/usr/bin/env bash
# Runs a command (usually python) against an extension built with FLUXMINI_SANITIZE: Python itself
# is not instrumented, so the ASan runtime must be loaded first (LD_PRELOAD). Leak checking is off
# (the interpreter keeps memory until exit by design); UBSan stops at its first report.
#   FLUXMINI_SANITIZE=address,undefined scripts/dev_build.sh /tmp/build-asan /opt/fmdev/bin/python
#   PYTHONPATH=/tmp/build-asan/pkg scripts/sanitized.sh /opt/fmdev/bin/python -m pytest tests/test_corrupt_files.py
set -euo pipefail
cc=${CXX:-g++}
asan=$("$cc" -print-file-name=libasan.so)
ubsan=$("$cc" -print-file-name=libubsan.so)
preload="$asan"
[ -e "$ubsan" ] && preload="$preload:$ubsan"
export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}"
exec "$@"
