"""Padding: token-budget micro-batches (launcher/data/budget.py) vs fixed-size micro-batches.

The data: sample lengths drawn from a long-tailed distribution (lognormal, mu 5, sigma 1: median
~150 tokens, clipped to [8, --max-len]), token ids random in a 256-token vocabulary. Each optimizer
step takes --per-device samples (the rank's share of one global batch), and runs them either

- fixed: micro-batches of --micro samples in the stream's order, each padded to its own longest
  sample (a padding collate), or
- budget: `split_by_tokens(lengths, budget)` with budget = --micro x --max-len, the same worst-case
  padded size per micro-batch as the fixed micro-batch: the same worst-case activation memory,
  for attention's quadratic part too (b x L <= budget and L <= --max-len give b x L^2 <=
  --micro x --max-len^2).

The model: embedding (width 64) + a 2-layer TransformerEncoder (4 heads, feed-forward 256, no
dropout, padding masked) + a linear head, a per-token loss summed and divided by the step's
tokens; forward and backward of every micro-batch of the step, the gradients accumulated (no
optimizer step: the weights stay fixed, so the two ways' step losses must agree, which the bench
checks). Both ways run on the same steps, interleaved step by step (order alternating) so that a
shared machine's drift hits both; the first step of each seed is a warm-up, not timed. samples/s =
timed samples / the wall time of their micro-batches' forward and backward; beside it the same
per CPU-second of this process (time.process_time), which other processes on a shared machine
disturb less. torch runs one intra-op thread by default (--threads): on 2 shared cores, two
threads made the wall times swing several-fold between seeds.

The padding fraction is measured on the timed steps (padding slots / all slots), and printed
beside what the plan would estimate from the seed's length sample (`expected_padding`,
`fixed_padding`, 200 draws).

    python bench/padding.py [--seeds 3] [--steps 6] [--per-device 64] [--micro 8] [--out x.json]
    python bench/padding.py --smoke   # seconds: tiny lengths, one seed, two steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher.data import IGNORE_INDEX
from launcher.data.budget import expected_padding, fixed_padding, padding_fraction, split_by_tokens

VOCAB = 256


class Encoder(nn.Module):
    def __init__(self, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x), src_key_padding_mask=pad))


def lengths_sample(seed: int, n: int, max_len: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(v) for v in np.clip(rng.lognormal(5.0, 1.0, n), 8, max_len)]


def padded(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, padding mask) of samples padded to the longest (targets: the inputs,
    a stand-in task; padding targets ignored)."""
    longest = max(len(s) for s in samples)
    x = torch.zeros(len(samples), longest, dtype=torch.int64)
    pad = torch.ones(len(samples), longest, dtype=torch.bool)
    for row, s in enumerate(samples):
        x[row, : len(s)], pad[row, : len(s)] = s, False
    return x, x.masked_fill(pad, IGNORE_INDEX), pad


def run_step(model: Encoder, samples: list[torch.Tensor], batches: list[list[int]]) -> float:
    """Forward and backward of every micro-batch; the step's loss (per token) and its seconds."""
    tokens = sum(len(s) for s in samples)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        x, y, pad = padded([samples[i] for i in b])
        loss = F.cross_entropy(model(x, pad).flatten(0, 1), y.flatten(), reduction="sum")
        (loss / tokens).backward()
        total += float(loss.detach()) / tokens
    return total


def one_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(seed)
    model = Encoder()
    sample = lengths_sample(seed, 10_000, args.max_len)
    budget = args.micro * args.max_len
    rng = np.random.default_rng([seed, 1])
    seconds = {"fixed": 0.0, "budget": 0.0}
    cpu_seconds = {"fixed": 0.0, "budget": 0.0}
    slots: dict[str, list[float]] = {"fixed": [], "budget": []}
    passes = {"fixed": 0, "budget": 0}
    worst = 0.0
    for step in range(args.steps + 1):
        lengths = [int(n) for n in rng.choice(sample, args.per_device)]
        samples = [torch.randint(VOCAB, (n,)) for n in lengths]
        ways = {
            "fixed": [list(range(i, i + args.micro)) for i in range(0, len(lengths), args.micro)],
            "budget": split_by_tokens(lengths, budget),
        }
        losses = {}
        for name in sorted(ways, reverse=step % 2 == 1):
            start, cpu = time.perf_counter(), time.process_time()
            losses[name] = run_step(model, samples, ways[name])
            if step:  # step 0 warms up
                seconds[name] += time.perf_counter() - start
                cpu_seconds[name] += time.process_time() - cpu
        worst = max(worst, abs(losses["fixed"] - losses["budget"]) / losses["fixed"])
        if step:
            for name, batches in ways.items():
                slots[name].append(padding_fraction(lengths, batches))
                passes[name] += len(batches)
    timed = args.steps * args.per_device
    out = {"seed": seed, "loss_rel_diff": worst}
    for name in ways:
        out[f"{name}_padding"] = float(np.mean(slots[name]))
        out[f"{name}_passes_per_step"] = passes[name] / args.steps
        out[f"{name}_samples_per_s"] = timed / seconds[name]
        out[f"{name}_samples_per_cpu_s"] = timed / cpu_seconds[name]
    out["plan_fixed_padding"] = fixed_padding(sample, args.per_device, args.micro, 200, seed)
    out["plan_budget_padding"] = expected_padding(sample, args.per_device, budget, 200, seed)
    out["speedup"] = out["budget_samples_per_s"] / out["fixed_samples_per_s"]
    out["cpu_speedup"] = out["budget_samples_per_cpu_s"] / out["fixed_samples_per_cpu_s"]
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1] for line in f if line.startswith("model name"))
            return next(names).strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per seed")
    parser.add_argument("--per-device", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny lengths, one seed, two steps")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.seeds, args.steps, args.per_device, args.micro, args.max_len = 1, 2, 8, 2, 256
    rows = [one_seed(seed, args) for seed in range(args.seeds)]
    print(
        f"# {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, torch "
        f"{torch.__version__}, intra-op threads {torch.get_num_threads()}, load average at the end "
        f"{os.getloadavg()[0]:.1f}; {args.per_device} samples per "
        f"step, fixed micro-batch {args.micro}, budget {args.micro * args.max_len} tokens"
    )
    print(
        "| seed | padding fixed | padding budget | plan's estimate (fixed / budget) | passes/step "
        "(fixed / budget) | samples/s fixed | samples/s budget | budget / fixed | per CPU-second: "
        "budget / fixed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['fixed_padding']:.3f} | {r['budget_padding']:.3f} | "
            f"{r['plan_fixed_padding']:.3f} / {r['plan_budget_padding']:.3f} | "
            f"{r['fixed_passes_per_step']:.1f} / {r['budget_passes_per_step']:.1f} | "
            f"{r['fixed_samples_per_s']:.1f} | {r['budget_samples_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x |"
        )
    worst = max(r["loss_rel_diff"] for r in rows)
    print(f"# the two ways' step losses agree to {worst:.1e} (relative): the same samples")
    if worst > 1e-4:
        raise SystemExit(f"step losses differ by {worst:.1e}: the two ways saw different samples")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
