#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine from the repository root (see bench/README.md):
#   here: python3 -m pip download ... -d .whl  (hydra-core omegaconf antlr4-python3-runtime mnist1d,
#         and a deepspeed wheel with its pure/cp312 dependencies: README "GPU check")
#   device run: bash bench/gpu_check.sh   (carry .whl)
# Writes under $OUT (or ./gpu-check-out): env.txt, summary.txt, runs.tgz (plans, metrics, ds_configs),
# the memory-finder log and the logs of failed steps; prints a summary table.
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
  python3 -c "import torch, accelerate, deepspeed; print('torch', torch.__version__, 'accelerate', \
accelerate.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"
  which nvcc || echo "no nvcc (DeepSpeed's fused optimizers are JIT-compiled with it)"
} 2>&1 | tee "$OUT/env.txt"

step() {  # name, timeout in s, then launcher arguments
  local name=$1 limit=$2; shift 2
  echo "== $name: python -m launcher $*"
  local t0=$SECONDS
  timeout "$limit" python3 -m launcher "$@" trainer.progress=false "run_dir=/tmp/gpu-$name" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc wall=$((SECONDS - t0))s"
  tail -n 2 "$OUT/$name.log"
  [ "$rc" = 0 ] && rm "$OUT/$name.log"  # few files come back from the device: keep failures only
}

R50=(+recipe=resnet50 data=synthetic data.train_samples=7680 data.eval_samples=512 data.workers=12
     global_batch=256 trainer.epochs=1 trainer.log_every=5)
# 1-4. ResNet-50 bf16 at global batch 256: Accelerate DDP vs DeepSpeed ZeRO 0, 1 and 2, all autocast
#      (BatchNorm); micro-batch from the probe; throughput, training peak vs the plan's prediction.
DSAC=(backend=deepspeed backend.mixed_precision=bf16 backend.autocast=true)
step r50_accelerate 150 "${R50[@]}" backend.mixed_precision=bf16
# 1b. The same without the noise scale (on by default, split mode here: one micro-batch on one GPU):
#     what measuring it costs on a real model, r50_accelerate's samples/s against this one's.
step r50_noise_off 150 "${R50[@]}" backend.mixed_precision=bf16 trainer.noise_scale=false
step r50_ds_zero0 150 "${R50[@]}" "${DSAC[@]}"
step r50_ds_zero1 150 "${R50[@]}" "${DSAC[@]}" backend.zero_stage=1
step r50_ds_zero2 150 "${R50[@]}" "${DSAC[@]}" backend.zero_stage=2
# 5. Activation checkpointing: the measured cap with and without (2 training steps).
step r50_ckpt 120 "${R50[@]}" data.train_samples=512 backend.mixed_precision=bf16 \
  model.activation_checkpointing=true
# 6. DeepSpeed's bf16 mode with its fused AdamW (JIT-compiled on first use): default recipe, 4 epochs.
TORCH_CUDA_ARCH_LIST=9.0 step ds_fused_adamw 240 optim=adamw backend=deepspeed backend.fused_optimizer=true \
  backend.mixed_precision=bf16 trainer.epochs=4 data.cache_dir=/tmp/m1d
# 7. The default recipe (MNIST-1D CNN, Accelerate, global batch 512): must still reach ~97%.
step default 120 data.cache_dir=/tmp/m1d
# 8. The gpt_small recipe on the standard library's sources (bf16 by mixed_precision=auto), ~90 steps of
#    64 x 256 tokens: tokens/s = samples/s x 256; its loss should fall well below ln 256 = 5.55.
step gpt_small 120 +recipe=gpt_small trainer.epochs=0.05 trainer.eval_every_epochs=0.05

tar czf "$OUT/runs.tgz" -C /tmp $(cd /tmp && ls -d gpu-*/plan.json gpu-*/metrics.jsonl gpu-*/ds_config.json 2>/dev/null)
python3 - /tmp <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
print("| run | finished | micro x accum | memory cap | predicted peak | training peak | samples/s (steps 10-end) | test acc |")
print("|---|---|---|---|---|---|---|---|")
for d in sorted(p for p in Path(sys.argv[1]).glob("gpu-*") if p.is_dir()):
    try:
        plan = json.loads((d / "plan.json").read_text())
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as exc:
        print(f"| {d.name[4:]} | no result ({exc.__class__.__name__}) |"); continue
    m = plan["memory"]
    peak = (m["overhead_bytes"] + max(c + a * plan["micro_batch"] for c, a in m["lines"])) if m else 0
    final = next((r for r in rows if r.get("final")), {})
    timed = [r for r in rows if "samples_per_s" in r and r["step"] >= 10]
    rate = 0.0
    if len(timed) >= 2:
        (s1, v1), (s2, v2) = [(r["step"], r["samples_per_s"]) for r in (timed[0], timed[-1])]
        gb = plan["global_batch"]
        rate = (s2 - s1) * gb / (s2 * gb / v2 - s1 * gb / v1)
    acc = next((r["eval_accuracy"] for r in reversed(rows) if "eval_accuracy" in r), float("nan"))
    gib = 2**30
    print(f"| {d.name[4:]} | {bool(final)} | {plan['micro_batch']} x {plan['accumulation']} | "
          f"{m.get('cap', '-')} | {peak / gib:.2f} GiB | {final.get('cuda_peak_bytes', 0) / gib:.2f} GiB | "
          f"{rate:,.0f} | {acc:.4f} |")
PY
# 8. Choosing the micro-batch from memory on a real allocator limit (8 GiB per process):
#    the launcher's probe (its default 0.5 GiB margin) vs Accelerate's and Lightning's finders vs
#    the true largest size.
echo "== memory finder (bench/memory_finder.py, cuda, 8 GiB)"
timeout 200 python3 bench/memory_finder.py --device cuda --budget-mib 8192 --image 224 --arch resnet50 \
  --precision bf16 --start 256 --margin-gib 0.5 --out "$OUT/memory_finder.json" \
  > "$OUT/memory_finder.log" 2>&1
echo "rc=$?"; grep -E "^\||true largest|Error" "$OUT/memory_finder.log" | tail -n 8
