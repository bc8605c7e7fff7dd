#!/usr/bin/env bash
# One short GPU check, for a lent CUDA machine: environment, the test suite,
# the benchmark (fp32 / bf16 / compile, with peak memory), then one AT epoch
# of WRN-16-1 <- WRN-16-2 on the real CIFAR-10 images.
#   bash scripts/gpu_check.sh [cifar10-jpg.tar.gz] [out_dir]
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=${1:-../shared/data/cifar10-jpg.tar.gz}
OUT=${2:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.txt"
python -m pytest -q -x 2>&1 | tail -5 | tee "$OUT/tests.txt"
DATA=$(mktemp -d)
tar -xzf "$ARCHIVE" -C "$DATA"
python scripts/benchmark.py --dataroot "$DATA/cifar10-jpg" --configs faithful,fast,fast-stepsync,fast-nocl,fast-bf16,fast-compile \
    --batch_size 128 --steps 50 --repeats 3 --nthread 8 2>&1 | tee "$OUT/benchmark.txt"
# a whole epoch and its test pass, as log.txt counts them
W=$(mktemp -d)
(cd "$W" && python "$OLDPWD/cifar.py" --dataroot "$DATA/cifar10-jpg" --depth 16 --width 2 --epochs 1 \
    --save logs/t --no_progress > /dev/null && python "$OLDPWD/cifar.py" --dataroot "$DATA/cifar10-jpg" \
    --teacher_id t --beta 1e+3 --epochs 2 --save logs/s --dtype bfloat16 --no_progress) 2>&1 | tail -4 | tee "$OUT/epoch.txt"
cp "$W/logs/s/log.txt" "$OUT/at_log.txt" 2>/dev/null
