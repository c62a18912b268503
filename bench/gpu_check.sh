#!/usr/bin/env bash
# GPU checks (issues 9, 22, 23), one prepared script for a lent GPU, run from the repository root:
#   here:       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#                 hydra-core omegaconf antlr4-python3-runtime mnist1d pytest iniconfig pluggy \
#                 deepspeed hjson ninja py-cpuinfo pydantic pydantic-core annotated-types \
#                 typing-inspection typing-extensions msgpack psutil einops
#   device run: bash bench/gpu_check.sh   (carry .whl; timeout_s 540 leaves the start-up its share)
# Runs in priority order inside GPU_CHECK_SECONDS (default 470: the issue's 8 minutes, less the
# install); a step that cannot finish in what is left is skipped and says so (the limits below add
# up to more than the budget: the late steps run only when the early ones finish well inside
# theirs). GPU_CHECK_STEPS=name,name,... runs only the named steps (e.g. pytest_gpu for a pass of
# the tests alone). Writes two files under $OUT (or ./gpu-check-out; the device tool returns at
# most 8): summary.txt (machine, versions, each step's exit status and key lines, appended as it
# goes) and results.tgz (every step's log, JSON and profiler tables).
# Issue 23 (GPU truth: the launcher vs a plain loop) first; ~estimates on an H100/H200 in brackets:
#   1. throughput_accelerate: bench/throughput.py, ResNet-50 bf16 channels-last images/s, launcher
#      (with and without the noise-scale meter) vs plain loop, MFU, Accelerate backend,
#      cudnn.benchmark on, eager; then torch.profiler tables of one more launcher and plain run [~70 s];
#   2. throughput_gpt: bench/throughput.py --model gpt, GPT 12 x 768 (12 heads), seq 1024,
#      micro-batch 32, bf16, eager: tokens/s and MFU (nanoGPT's 6N + 12LHQT), launcher vs a
#      nanoGPT-style loop (AdamW fused), profiler tables as in 1 [~45 s];
#   3. input_pipeline: bench/input_pipeline.py, the ImageFolder loader's images/s (JPEG decode and
#      augmentation in 1, 2, half and all of the machine's cores as workers, pin_memory on) [~45 s];
#   4. throughput_compile: step 1 with --compile (torch.compile both sides), plain and launcher
#      only, one repeat [~100 s: compilation];
#   5. throughput_gpt_compile: step 2 with --compile, plain and launcher only [~80 s];
#   6. throughput_gpt_host: step 2 with --host-batches (pinned host token batches copied per step,
#      as a loader's: the launcher then counts tokens on the host, no device read), plain and
#      launcher only [~35 s];
# then the earlier checks (issues 9 and 22):
#   7. pytest -m gpu (tests/test_gpu.py): probe vs allocator, injected and real OOM recovery,
#      bf16 vs float32, DeepSpeed FusedAdam / FusedLamb (JIT-compiled: ~50 s each on first use);
#   8. step 1 with DeepSpeed ZeRO 2 (against its own plain-loop baseline in the same process);
#   9. step 1 with cudnn.benchmark off (the launcher's default), one repeat, no profile;
# 10. bench/memory_finder.py under an 8 GiB allocator limit (launcher vs Accelerate vs Lightning);
# 11. the gpt_small recipe, ~90 steps (bf16 by auto);
# 12. bench/fsdp_memory.py (issue 22 memory): backend=fsdp's per-rank peak (the allocator's) vs the
#      probe's sharding-credited prediction, bf16, OOM-safe and in-backward reduction. One GPU is one
#      rank (NCCL, world size 1: the credit is then a debit, the shard beside the gathered copy);
#      on a machine with 2 GPUs set FSDP_RANKS=2 for the 2-rank check the CPU bench ran on gloo.
# 13. bench/backends.py (issue 22 speed, last and time-boxed: ~90 s, no run starts after 70 s):
#      GPT 12 x 768, seq 512, bf16, accumulation 2, 40 steps, one rank per GPU: samples/s and the
#      allocator's peak (cuda_peak_bytes) for DDP, ZeRO 2, ZeRO 3, FSDP2 (OOM-safe, then plain).
# GPU_CHECK_CPU=1 GPU_CHECK_PYTHON=.venv/bin/python: a CPU dry run of steps 1-6 at smoke sizes
# (35 s on 2 cores with a warm inductor cache, ~2 minutes cold). With the default budget steps 1-6
# take ~375 s, so pytest_gpu (needs 200 s) is then skipped: run it alone with
# GPU_CHECK_STEPS=pytest_gpu when the tests are what a session needs.
set -uo pipefail
OUT=${OUT:-gpu-check-out}
BUDGET=${GPU_CHECK_SECONDS:-470}
W=/tmp/gpu-check  # step logs and JSON; packed into $OUT/results.tgz at the end
rm -rf "$W" && mkdir -p "$OUT" "$W"
if [ -z "${GPU_CHECK_CPU:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then  # not in a CPU dry run
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "${GPU_CHECK_PYTHON:-python3}" -c "import torch, accelerate, deepspeed; print('torch', torch.__version__, 'accelerate', \
accelerate.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available())"
  which nvcc || echo "no nvcc (DeepSpeed's fused optimizers are JIT-compiled with it)"
  nproc
} 2>&1 | tee "$OUT/summary.txt"

START=$SECONDS
step() {  # name, seconds it needs at least, seconds it may take at most, then the command
  local name=$1 need=$2 limit=$3; shift 3
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    echo "== $name: not selected (GPU_CHECK_STEPS)" >> "$OUT/summary.txt"
    return
  fi
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

PY=${GPU_CHECK_PYTHON:-python3}
TP=("$PY" bench/throughput.py --batch 256 --steps 40)
GPT=("$PY" bench/throughput.py --model gpt --layers 12 --width 768 --heads 12 --seq 1024 --batch 32
  --steps 40)
IP=("$PY" bench/input_pipeline.py --device cuda --seconds 6)
if [ -n "${GPU_CHECK_CPU:-}" ]; then  # a CPU dry run of steps 1-6 at smoke sizes (later flags win)
  TP+=(--device cpu --arch resnet18 --image 64 --batch 16 --steps 4)
  GPT+=(--device cpu --layers 2 --width 64 --heads 2 --seq 64 --batch 8 --steps 6)
  IP+=(--device cpu --images 128 --seconds 2)
  GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-throughput_accelerate,throughput_gpt,input_pipeline,throughput_compile,throughput_gpt_compile,throughput_gpt_host}
fi
# -- issue 23: the launcher vs plain loops, eager then compiled, and the input pipeline
step throughput_accelerate 60 120 "${TP[@]}" --repeats 2 --cudnn-benchmark \
  --profile "$W/throughput_accelerate.prof.txt" --out "$W/throughput_accelerate.json"
step throughput_gpt 45 90 "${GPT[@]}" --repeats 2 --profile "$W/throughput_gpt.prof.txt" \
  --out "$W/throughput_gpt.json"
step input_pipeline 40 75 "${IP[@]}" --out "$W/input_pipeline.json"
step throughput_compile 110 200 "${TP[@]}" --repeats 1 --cudnn-benchmark --compile \
  --sides plain,launcher --out "$W/throughput_compile.json"
step throughput_gpt_compile 90 170 "${GPT[@]}" --repeats 2 --compile --sides plain,launcher \
  --out "$W/throughput_gpt_compile.json"
step throughput_gpt_host 40 80 "${GPT[@]}" --repeats 2 --host-batches --sides plain,launcher \
  --out "$W/throughput_gpt_host.json"
# -- issues 9 and 22
step pytest_gpu 200 310 env LAUNCHER_REQUIRE_GPU_TESTS=1 "$PY" -m pytest -m gpu tests/test_gpu.py \
  -p no:cacheprovider -q -rA --durations=0
step throughput_zero2 70 110 "${TP[@]}" --repeats 2 --cudnn-benchmark --backend deepspeed \
  --zero-stage 2 --out "$W/throughput_zero2.json"
step throughput_no_autotune 45 80 "${TP[@]}" --repeats 1 --out "$W/throughput_no_autotune.json"
step memory_finder 90 150 "$PY" bench/memory_finder.py --device cuda --budget-mib 8192 --image 224 \
  --arch resnet50 --precision bf16 --start 256 --margin-gib 0.5 --out "$W/memory_finder.json"
step gpt_small 60 100 "$PY" -m launcher +recipe=gpt_small trainer.epochs=0.05 \
  trainer.eval_every_epochs=0.05 trainer.progress=false run_dir=/tmp/gpu-gpt_small
cp /tmp/gpu-gpt_small/plan.json /tmp/gpu-gpt_small/metrics.jsonl "$W/" 2>/dev/null
step fsdp_memory 60 120 bash -c 'set -e; for m in true false; do
  python3 -m torch.distributed.run --nproc_per_node "$1" bench/fsdp_memory.py --device cuda --micro 8 \
    --json "$0/fsdp_memory_$m.json" -- +recipe=gpt_small model.layers=8 model.width=256 model.heads=4 \
    data.seq_len=256 "global_batch=$((16 * $1))" backend.mixed_precision=bf16 "trainer.oom_recovery=$m"
done' "$W" "${FSDP_RANKS:-1}"
# -- 13. backends side by side (issue 22): late, time-boxed; its per-run lines are in the log as they go
step backends 60 95 "$PY" bench/backends.py --device cuda --repeats 1 --budget-s 70 \
  --run-timeout-s 60 --no-baseline --out "$W/backends.json"

{
  for f in "$W"/throughput_*.log; do
    [ -e "$f" ] && { echo; echo "-- $(basename "$f")"; grep -h -E "images/s|tokens/s|^ratio|, torch |FLOP per|optimizer" "$f"; }
  done
  for f in "$W"/*.prof.txt; do  # the top rows of each profiler table
    [ -e "$f" ] && { echo; echo "-- $(basename "$f")"; grep -h -A 13 "^== " "$f" | cut -c1-160; }
  done
  echo; grep -h -E "^wrote|cores|^workers" "$W/input_pipeline.log" 2>/dev/null
  echo; grep -h -E "passed|failed|error|s call " "$W/pytest_gpu.log" 2>/dev/null | tail -n 16
  echo; grep -h -E "^\||true largest" "$W/memory_finder.log" 2>/dev/null
  echo; tail -n 2 "$W/metrics.jsonl" 2>/dev/null
  echo; grep -h '^{' "$W/fsdp_memory.log" 2>/dev/null | cut -c1-1500
  echo; grep -h -A3 -E "^(cuda:|\[0\]|total|ddp|zero|fsdp)" "$W/backends.log" 2>/dev/null | head -n 40
  echo "== total $((SECONDS - START))s of ${BUDGET}s"
} >> "$OUT/summary.txt"
tar czf "$OUT/results.tgz" -C "$W" .
cat "$OUT/summary.txt"
