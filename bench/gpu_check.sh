#!/usr/bin/env bash
# GPU checks (issue 9), one prepared script for a lent GPU, run from the repository root:
#   here:       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#                 hydra-core omegaconf antlr4-python3-runtime mnist1d pytest iniconfig pluggy \
#                 deepspeed hjson ninja py-cpuinfo pydantic pydantic-core annotated-types \
#                 typing-inspection typing-extensions msgpack psutil einops
#   device run: bash bench/gpu_check.sh   (carry .whl; timeout_s 540 leaves the start-up its share)
# Runs in priority order inside GPU_CHECK_SECONDS (default 470: the 8 minutes, less the
# install); a step that cannot finish in what is left is skipped and says so. Writes two files under
# $OUT (or ./gpu-check-out; the device tool returns at most 8): summary.txt (machine, versions, each
# step's exit status and key lines, appended as it goes) and results.tgz (every step's log and JSON).
#   1. bench/throughput.py: ResNet-50 bf16 channels-last images/s, launcher vs plain loop, MFU
#      (the launcher with and without the noise-scale meter), Accelerate backend, cudnn.benchmark on;
#   2. pytest -m gpu (tests/test_gpu.py): probe vs allocator, injected and real OOM recovery,
#      bf16 vs float32, DeepSpeed FusedAdam / FusedLamb (JIT-compiled: ~50 s each on first use);
#   3. step 1 with DeepSpeed ZeRO 2 (against its own plain-loop baseline in the same process);
#   4. step 1 with cudnn.benchmark off (the launcher's default), one repeat;
#   5. bench/memory_finder.py under an 8 GiB allocator limit (launcher vs Accelerate vs Lightning);
#   6. the gpt_small recipe, ~90 steps (bf16 by auto);
#   7. bench/fsdp_memory.py (issue 22 memory): backend=fsdp's per-rank peak (the allocator's) vs the
#      probe's sharding-credited prediction, bf16, OOM-safe and in-backward reduction. One GPU is one
#      rank (NCCL, world size 1: the credit is then a debit, the shard beside the gathered copy);
#      on a machine with 2 GPUs set FSDP_RANKS=2 for the 2-rank check the CPU bench ran on gloo.
#   8. bench/backends.py (issue 22 speed, last and time-boxed: ~90 s, no run starts after 70 s):
#      GPT 12 x 768, seq 512, bf16, accumulation 2, 40 steps, one rank per GPU: samples/s and the
#      allocator's peak (cuda_peak_bytes) for DDP, ZeRO 2, ZeRO 3, FSDP2 (OOM-safe, then plain).
set -uo pipefail
OUT=${OUT:-gpu-check-out}
BUDGET=${GPU_CHECK_SECONDS:-470}
W=/tmp/gpu-check  # step logs and JSON; packed into $OUT/results.tgz at the end
rm -rf "$W" && mkdir -p "$OUT" "$W"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, accelerate, deepspeed; print('torch', torch.__version__, 'accelerate', \
accelerate.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available())"
  which nvcc || echo "no nvcc (DeepSpeed's fused optimizers are JIT-compiled with it)"
  nproc
} 2>&1 | tee "$OUT/summary.txt"

START=$SECONDS
step() {  # name, seconds it needs at least, seconds it may take at most, then the command
  local name=$1 need=$2 limit=$3; shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$need" ]; then
    echo "== $name: SKIPPED, ${left}s of the budget left, needs ${need}s" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc wall=$((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 12 "$W/$name.log"
}

TP=(python3 bench/throughput.py --batch 256 --steps 40)
step throughput_accelerate 60 110 "${TP[@]}" --repeats 2 --cudnn-benchmark \
  --out "$W/throughput_accelerate.json"
step pytest_gpu 200 310 env LAUNCHER_REQUIRE_GPU_TESTS=1 python3 -m pytest -m gpu tests/test_gpu.py \
  -p no:cacheprovider -q -rA --durations=0
step throughput_zero2 70 110 "${TP[@]}" --repeats 2 --cudnn-benchmark --backend deepspeed \
  --zero-stage 2 --out "$W/throughput_zero2.json"
step throughput_no_autotune 45 80 "${TP[@]}" --repeats 1 --out "$W/throughput_no_autotune.json"
step memory_finder 90 150 python3 bench/memory_finder.py --device cuda --budget-mib 8192 --image 224 \
  --arch resnet50 --precision bf16 --start 256 --margin-gib 0.5 --out "$W/memory_finder.json"
step gpt_small 60 100 python3 -m launcher +recipe=gpt_small trainer.epochs=0.05 \
  trainer.eval_every_epochs=0.05 trainer.progress=false run_dir=/tmp/gpu-gpt_small
cp /tmp/gpu-gpt_small/plan.json /tmp/gpu-gpt_small/metrics.jsonl "$W/" 2>/dev/null
step fsdp_memory 60 120 bash -c 'set -e; for m in true false; do
  python3 -m torch.distributed.run --nproc_per_node "$1" bench/fsdp_memory.py --device cuda --micro 8 \
    --json "$0/fsdp_memory_$m.json" -- +recipe=gpt_small model.layers=8 model.width=256 model.heads=4 \
    data.seq_len=256 "global_batch=$((16 * $1))" backend.mixed_precision=bf16 "trainer.oom_recovery=$m"
done' "$W" "${FSDP_RANKS:-1}"
# -- 8. backends side by side (issue 22): late, time-boxed; its per-run lines are in the log as they go
step backends 60 95 python3 bench/backends.py --device cuda --repeats 1 --budget-s 70 \
  --run-timeout-s 60 --no-baseline --out "$W/backends.json"

{
  echo; grep -h -E "images/s|^ratio|torch" "$W"/throughput_*.log 2>/dev/null
  echo; grep -h -E "passed|failed|error|s call " "$W/pytest_gpu.log" 2>/dev/null | tail -n 16
  echo; grep -h -E "^\||true largest" "$W/memory_finder.log" 2>/dev/null
  echo; tail -n 2 "$W/metrics.jsonl" 2>/dev/null
  echo; grep -h '^{' "$W/fsdp_memory.log" 2>/dev/null | cut -c1-1500
  echo; grep -h -A3 -E "^(cuda:|\[0\]|total|ddp|zero|fsdp)" "$W/backends.log" 2>/dev/null | head -n 40
  echo "== total $((SECONDS - START))s of ${BUDGET}s"
} >> "$OUT/summary.txt"
tar czf "$OUT/results.tgz" -C "$W" .
cat "$OUT/summary.txt"
