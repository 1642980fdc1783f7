"""Per-op CPU time of one MoCo training step in fp32 and in bf16 autocast (torch.profiler).

Why: bf16 is 1.5-2x faster than fp32 on one CPU and 10x slower on another; the per-op table
shows where the time goes, e.g. which convolutions leave oneDNN for aten's `_slow_conv2d`.
The step is the workers' own (build_model + MoCo.forward + backward + SGD) on random images,
after warm-up steps (oneDNN creates its kernels there); each precision keeps its least disturbed
of --rounds profiled steps. Run with ONEDNN_MAX_CPU_ISA=AVX2 (or
AVX512_CORE) to see what a CPU without native bf16 does. Ends with ONE JSON line. Example:

    .venv/bin/python bench/profile_step.py --params params.yaml --batch-size 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.config import load_params, with_overrides
from pipeline.method import build_model
from pipeline.precision import cpu_flags

WARMUP_STEPS = 2


def profile_steps(args: argparse.Namespace) -> dict[bool, Counter[str]]:
    """Self CPU milliseconds per aten op of one step, for fp32 (False) and bf16 (True).

    Both precisions step the same model in turn for --rounds rounds, and each keeps its least
    disturbed round (the lowest total): on a shared machine one step can be slowed several
    times over by another job, and the minimum is the closest to the step's own cost."""
    params = with_overrides(
        load_params(args.params, args.set),
        {"train.batch_size": args.batch_size, "train.num_workers": 1},
    )
    m = params.model
    torch.manual_seed(0)
    model = build_model(params, world_size=1).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(args.batch_size, m.in_channels, m.image_size, m.image_size)
    images = images.contiguous(memory_format=torch.channels_last)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(images, images.flip(-1)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    best: dict[bool, Counter[str]] = {}
    for round_ in range(WARMUP_STEPS + args.rounds):
        for bf16 in (False, True):
            if round_ < WARMUP_STEPS:
                step(bf16)
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(bf16)
            ops = Counter(
                {
                    e.key: e.self_cpu_time_total / 1000
                    for e in prof.key_averages()
                    if e.key.startswith("aten")
                }
            )
            if bf16 not in best or ops.total() < best[bf16].total():
                best[bf16] = ops
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, as mocopipe's")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10, help="ops per precision in the table")
    parser.add_argument("--rounds", type=int, default=3, help="profiled steps per precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    best = profile_steps(args)
    fp32, bf16 = best[False], best[True]

    ops = list(
        dict.fromkeys(
            [op for op, _ in fp32.most_common(args.rows)]
            + [op for op, _ in bf16.most_common(args.rows)]
        )
    )
    print(f"{'op (self CPU ms, one step)':<40} {'fp32':>9} {'bf16':>9} {'bf16/fp32':>9}")
    for op in ops:
        ratio = bf16[op] / fp32[op] if fp32[op] else float("inf")
        print(f"{op:<40} {fp32[op]:9.1f} {bf16[op]:9.1f} {ratio:9.2f}")
    print(
        f"{'total (aten ops)':<40} {fp32.total():9.1f} {bf16.total():9.1f} "
        f"{bf16.total() / fp32.total():9.2f}"
    )
    print(
        json.dumps(
            {
                "params": args.params,
                "set": args.set,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
                "native_bf16_flags": sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()),
                "total_ms": {"fp32": round(fp32.total(), 1), "bf16": round(bf16.total(), 1)},
                "ops_ms": {
                    op: {"fp32": round(fp32[op], 1), "bf16": round(bf16[op], 1)} for op in ops
                },
            }
        )
    )


if __name__ == "__main__":
    main()
