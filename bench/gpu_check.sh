#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine from the repository root (see bench/README.md):
#   python3 -m pip download ... -d .whl hydra-core omegaconf antlr4-python3-runtime mnist1d  (here)
#   device run: bash bench/gpu_check.sh   (carry .whl)
# Writes logs and run directories' metrics under $OUT (or ./gpu-check-out).
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

step() {  # name, then launcher arguments
  local name=$1; shift
  echo "== $name: python -m launcher $*"
  local t0=$SECONDS
  python3 -m launcher "$@" trainer.progress=false "run_dir=/tmp/gpu-$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc wall=$((SECONDS - t0))s"
  tail -n 3 "$OUT/$name.log"
  cp "/tmp/gpu-$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
}

# 1. The default recipe on one GPU (MNIST-1D CNN, global batch 512): must still reach ~97%.
step default data.cache_dir=/tmp/m1d
# 2. ResNet-50 recipe on synthetic ImageNet-shaped data, bf16 autocast, global batch 256, one GPU.
step resnet50_bf16 +recipe=resnet50 data=synthetic data.train_samples=7680 data.eval_samples=512 \
  data.workers=12 global_batch=256 backend.mixed_precision=bf16 trainer.epochs=1 trainer.log_every=5
# 3. Same with accumulation: micro 64 x 4 must give the same plan numbers and train.
step resnet50_accum +recipe=resnet50 data=synthetic data.train_samples=2560 data.eval_samples=256 \
  data.workers=12 global_batch=256 micro_batch=64 backend.mixed_precision=bf16 trainer.epochs=1
grep -h samples_per_s "$OUT"/resnet50_bf16.metrics.jsonl | tail -n 3
for run in default resnet50_bf16; do  # the measured memory profile behind each plan
  python3 -c "import json,sys; p=json.load(open(sys.argv[1])); m=p['memory']; print(sys.argv[1], \
    'micro', p['micro_batch'], 'accum', p['accumulation'], {k: m.get(k) for k in \
    ('source', 'cap', 'probe_steps', 'overhead_bytes', 'budget_bytes', 'note')})" \
    "/tmp/gpu-$run/plan.json"
done
# 4. Choosing the micro-batch from memory on a real allocator limit (8 GiB per process):
#    the launcher's probe vs Accelerate's and Lightning's finders vs the true largest size.
echo "== memory finder (bench/memory_finder.py, cuda, 8 GiB)"
timeout 300 python3 bench/memory_finder.py --device cuda --budget-mib 8192 --image 224 --arch resnet50 \
  --precision bf16 --start 256 --out "$OUT/memory_finder.json" > "$OUT/memory_finder.log" 2>&1
echo "rc=$?"; grep -E "^\||true largest|Error" "$OUT/memory_finder.log" | tail -n 8
