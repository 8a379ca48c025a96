#!/usr/bin/env bash
# The GPU check, in one go, on a machine with an NVIDIA GPU: the GPU tests, then the GPU
# benchmark (the convolution ladder, the other kernels, the training step). Logs and results
# go to $OUT (default benchmarks/results); about 6-9 minutes on an H200. The benchmark
# rewrites its JSON after every measurement, so a run cut short keeps what it measured
# ("complete": false in the JSON).
#
# Expects Python 3 with numpy, CuPy (cupy-cuda13x) and a CUDA build of PyTorch installed;
# installs nothing heavy: minunet itself without dependencies, and pytest/hypothesis only if
# they are missing and an index is reachable. Usage:  OUT=/some/dir benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== environment"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PYTHON" - <<'PY'
import platform, numpy, cupy, torch
print("python", platform.python_version(), "numpy", numpy.__version__, "cupy", cupy.__version__,
      "torch", torch.__version__, "torch.cuda", torch.version.cuda, torch.cuda.is_available())
print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
PY

echo "== install minunet (no dependencies)"
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . \
  || echo "editable install failed: using the source tree through PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for module in pytest hypothesis tqdm scipy tifffile; do  # the test and minunet dependencies
  "$PYTHON" -c "import $module" 2>/dev/null \
    || timeout 60 "$PYTHON" -m pip install --quiet "$module" \
    || echo "$module is missing and could not be installed"
done

echo "== GPU tests (pytest -m gpu)"
# Collection errors (a test module needing a package this machine lacks) must not stop the
# GPU tests of the other modules.
timeout 150 "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml" tests
tests_status=$?
echo "pytest exit status: $tests_status"

echo "== GPU benchmark"
timeout 420 "$PYTHON" benchmarks/bench_gpu.py --output "$OUT/gpu.json"
bench_status=$?
echo "benchmark exit status: $bench_status"
if [ -f "$OUT/gpu.json" ] && [ "$OUT" != "benchmarks/results" ]; then
  cp "$OUT/gpu.json" benchmarks/results/gpu.json
fi
exit $(( tests_status != 0 || bench_status != 0 ))
