#!/usr/bin/env bash
# The fuzzing campaign (docs/FUZZING.md): every harness under ASan+UBSan, for a number of runs
# or a time limit each, niced (the machine is shared). Findings land in $OUT/artifacts/<target>-*.
#
# Usage: fuzz/campaign.sh [TARGET ...]      (default: all nine)
#   C++ (libFuzzer, fuzz/build.sh): gguf_bytes gguf_struct safetensors
#   Python (atheris, fuzz/harnesses.py): weights after_load prompt png_metadata init_image server
# Environment:
#   OUT=/tmp/fluxmini-fuzz      binaries in $OUT/bin, seeds in $OUT/seeds, corpora in $OUT/corpus
#   GGUF_RUNS=1000000           runs of the GGUF harnesses (gguf_bytes, gguf_struct, weights)
#   OTHER_RUNS=200000           runs of every other harness
#   MAX_TIME=0                  seconds per harness (0: no limit, runs only)
#   NICE=15                     niceness of the fuzzers (the machine is shared)
#   PY=/opt/fmdev/bin/python    the Python with fluxmini's dependencies and atheris (the `fuzz` extra)
#   ASAN_PKG=/tmp/build-asan/pkg   a FLUXMINI_SANITIZE=address,undefined dev build (scripts/dev_build.sh)
#                               for the harnesses that reach the extension (weights, after_load);
#                               empty: they run against the fluxmini on PYTHONPATH / installed
# prompt, png_metadata, init_image and server never reach the extension (tokenizers, Pillow, the
# server's request parsing with a stand-in worker) and run
# against the fluxmini on PYTHONPATH without the ASan preload: gcc's libasan would take over the
# coverage callbacks atheris registers, leaving those fuzzers blind.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fluxmini-fuzz}
GGUF_RUNS=${GGUF_RUNS:-1000000}
OTHER_RUNS=${OTHER_RUNS:-200000}
MAX_TIME=${MAX_TIME:-0}
NICE=${NICE:-15}
PY=${PY:-/opt/fmdev/bin/python}
ASAN_PKG=${ASAN_PKG-/tmp/build-asan/pkg}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_bytes gguf_struct safetensors weights after_load prompt png_metadata init_image server)

mkdir -p "$OUT/artifacts" "$OUT/logs"
[ -d "$OUT/seeds" ] || "$PY" "$root/fuzz/make_seeds.py" "$OUT/seeds"
common=(-timeout=10 -rss_limit_mb=4096 -max_total_time="$MAX_TIME" -print_final_stats=1)
status=0
for t in "${targets[@]}"; do
  runs=$OTHER_RUNS
  case $t in gguf_bytes|gguf_struct|weights) runs=$GGUF_RUNS ;; esac
  corpus="$OUT/corpus/$t"; mkdir -p "$corpus"
  seeds="$OUT/seeds/$t"
  case $t in gguf_bytes) seeds="$OUT/seeds/gguf_bytes" ;; weights) seeds="$OUT/seeds/gguf_bytes" ;; esac
  [ -d "$seeds" ] || seeds=""
  log="$OUT/logs/$t.log"
  start=$(date +%s)
  case $t in
    gguf_bytes|gguf_struct|safetensors)
      # -malloc_limit_mb: no single allocation may exceed 256 MiB for inputs of at most 64 KiB.
      FUZZ_TMPDIR=${FUZZ_TMPDIR:-/dev/shm} nice -n "$NICE" "$OUT/bin/fuzz_$t" "${common[@]}" -runs="$runs" \
        -max_len=65536 -malloc_limit_mb=256 -artifact_prefix="$OUT/artifacts/$t-" \
        "$corpus" $seeds >"$log" 2>&1 ;;
    *)
      wrap=(); pkg=${PYTHONPATH:-}
      if [ -n "$ASAN_PKG" ] && { [ "$t" = weights ] || [ "$t" = after_load ]; }; then
        wrap=("$root/scripts/sanitized.sh"); pkg=$ASAN_PKG
      fi
      # after_load reads its choices from the input: full-length inputs from the start. Prompts
      # longer than 4 KiB add nothing (the harness repeats some 50 times); requests are built from
      # at most 2 KiB (long fields come from the harness's own tables).
      # Under the preload libFuzzer sees no coverage (docs/FUZZING.md) and would keep no seed:
      # -keep_seed=1 makes it mutate all of them.
      case $t in
        after_load) extra=(-len_control=0 -max_len=256 -keep_seed=1) ;;
        prompt) extra=(-max_len=4096) ;;
        server) extra=(-len_control=0 -max_len=2048) ;;
        *) extra=(-max_len=65536) ;;
      esac
      PYTHONPATH="$pkg" nice -n "$NICE" "${wrap[@]}" "$PY" "$root/fuzz/run_atheris.py" "$t" \
        "${common[@]}" -runs="$runs" "${extra[@]}" -artifact_prefix="$OUT/artifacts/$t-" "$corpus" $seeds >"$log" 2>&1 ;;
  esac
  rc=$?
  [ $rc -eq 0 ] || status=1
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  echo "$t: rc=$rc execs=${execs:-?} seconds=$(( $(date +%s) - start )) log=$log"
done
# the harnesses' scratch model files (named by process id) of processes that are gone
for f in "${FUZZ_TMPDIR:-/dev/shm}"/fluxmini-fuzz-*.bin "${FUZZ_TMPDIR:-/dev/shm}"/fluxmini-pyfuzz-*; do
  [ -e "$f" ] || continue
  pid=$(basename "$f" | sed -E 's/^fluxmini-(py)?fuzz-([0-9]+).*/\2/')
  case $pid in ''|*[!0-9]*) continue ;; esac
  kill -0 "$pid" 2>/dev/null || rm -f "$f"
done
ls "$OUT/artifacts" | head -20
exit $status
