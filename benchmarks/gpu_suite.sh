#!/usr/bin/env bash
# Every GPU measurement in one call (a lent GPU machine is held by the minute).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [WHEEL_DIR]
#
# Runs: the GPU tests, the 2CXM fit of 10^6 voxels x 60 frames (with scipy on a sample in the same
# run), QTMnet inference on 128x128x32x60, the DP step cost per task network, and the training-loop
# throughput. WHEEL_DIR (optional) holds wheels the machine lacks (opacus, monai, nibabel, nilearn);
# they are installed into /tmp/site. Each step has its own time limit, and one failing step does not
# stop the others. Results: OUT_DIR/*.json and OUT_DIR/gpu_suite.log.
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$PWD:$PYTHONPATH
PY=${PY:-python3}
step() { # name limit_s command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" || echo "=== $name FAILED or timed out (rc=$?)"
}
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
[ -n "${SKIP_DCE:-}" ] || step dce_fit 240 $PY benchmarks/dce_fit.py --voxels 1000000 --frames 60 --device cuda \
  --chunk-size 250000 --scipy-sample 200 --json "$OUT/dce_fit.json"
[ -n "${SKIP_QTM:-}" ] || step qtm_inference 120 $PY benchmarks/qtm_inference.py --device cuda --repeats 20 \
  --json "$OUT/qtm_inference.json"
if [ -f runs/qtmnet/configs/metadata.json ]; then
  step qtm_inference_trained 120 $PY benchmarks/qtm_inference.py --device cuda --repeats 20 \
    --model runs/qtmnet --json "$OUT/qtm_inference_trained.json"
fi
step dp_step_cost 300 $PY benchmarks/dp_step_cost.py --size 64 --batch 8 --steps 20 --device cuda \
  --modes ${DP_MODES:-hooks,functorch,ew,ghost}
step gpu_tests 180 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts=""
step train_throughput_64 240 $PY benchmarks/train_throughput.py --network resnet10 --size 64 --batch 8 \
  --cases 24 --steps 20 --device cuda --amp --channels-last --json "$OUT/train_throughput_64.json"
step train_throughput_128 300 $PY benchmarks/train_throughput.py --network resnet10 --size 128 --batch 16 \
  --cases 32 --cohort-shape 64 --steps 20 --device cuda --amp --channels-last \
  --json "$OUT/train_throughput_128.json"
} 2>&1 | tee "$OUT/gpu_suite.log"
