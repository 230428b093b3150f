#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (the device tool): the tests marked `gpu`, then the
# benchmarks that print GPU figures.  The machine's own python3 holds a CUDA torch; the few pure-Python
# dependencies it lacks travel as wheels in .whl/ (see the device tool's README).  Writes logs under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
rc=0
timeout ${GPU_TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
# issue 26: diagnose of the 11M-parameter ResNet on CUDA <= 30x one forward+backward (the table says met / not met)
echo "== benchmarks/diagnose.py --device cuda"
timeout ${GPU_DIAGNOSE_TIMEOUT:-240} python3 benchmarks/diagnose.py --device cuda 2>&1 | tee -a "$OUT/gpu_bench.log"
for b in ${GPU_BENCHMARKS:-}; do
  echo "== $b"; timeout 120 python3 "$b" 2>&1 | tee -a "$OUT/gpu_bench.log"
done
exit $rc
