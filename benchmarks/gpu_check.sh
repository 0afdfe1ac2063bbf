#!/usr/bin/env bash
# The GPU check as one script (used on the lent H100: no network there, so wheels and the
# libggml-python sdist travel in .whl/). Builds ggml with CUDA, builds fluxmini against it,
# checks CUDA-vs-CPU parity on tiny models and times the full-size model's stages.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
t0=$(date +%s)
BUILD_DIR=/tmp/ggml-build third_party/build_ggml.sh cuda /tmp/ggml-cuda .whl/libggml_python-0.20.2.post1.tar.gz \
  -- -DCMAKE_CUDA_ARCHITECTURES=90 > "$out/ggml_build.log" 2>&1 || { tail -40 "$out/ggml_build.log"; exit 1; }
echo "ggml CUDA build: $(( $(date +%s) - t0 )) s"
FLUXMINI_GGML_PREFIX=/tmp/ggml-cuda python3 -m pip install -q --no-build-isolation --no-deps --no-index \
  --target /tmp/fm . > "$out/fluxmini_build.log" 2>&1 || { tail -40 "$out/fluxmini_build.log"; exit 1; }
echo "fluxmini build: $(( $(date +%s) - t0 )) s"
export PYTHONPATH=/tmp/fm:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
full=""
if [ "${FULL:-1}" = 1 ]; then
  python3 benchmarks/make_random.py -o /tmp/FLUX.1-mini-Q4_0.gguf --variant Q4_0 -q && full=/tmp/FLUX.1-mini-Q4_0.gguf
fi
# Each check in its own process: a failed GGML_ASSERT in one must not hide the others.
export PYTHONUNBUFFERED=1
# Every check runs even after a failure; the script's exit status says whether any failed.
: > "$out/gpu_check.log"
failed=()
for check in transformer encode_t5 encode_clip vae_decode vae_encode; do
  set +e
  python3 benchmarks/gpu_check.py --backend cuda --only $check 2>&1 | grep -v "^backends" | tee -a "$out/gpu_check.log"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || failed+=("$check (exit $rc)")
done
if [ -n "$full" ]; then
  set +e
  timeout "${FULL_TIMEOUT:-300}" python3 benchmarks/gpu_check.py --backend cuda --no-parity --repeats "${REPEATS:-2}" -v --full "$full" 2>&1 | tee -a "$out/gpu_check.log"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || failed+=("full-size timing (exit $rc)")
fi
if grep -q "PARITY FAILED" "$out/gpu_check.log"; then failed+=("a parity line says FAILED"); fi
if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "gpu_check: all checks passed"
