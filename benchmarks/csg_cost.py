"""CSG cost benchmark: parameters, payload bytes and CPU train-step time of ResNet-56 variants, side by side.

Rows: dense, CSG [16,16,3,3]-128, CSG [12,12,3,3]-72, CSG-128 with a frozen generator shared from a
ResNet-20 CSG model (the paper's "pre-trained CSG" row), BCSG (binary frozen generator, the paper's n_c=1024).
Step times are measured interleaved step by step (``--repeats`` blocks of ``--steps`` steps of every
variant) so load drift hits all variants alike; the reported ratio is the median over repeats of the
per-repeat ratio of median step times to dense, with its range. The run refuses to start above load average
1.5 (``--force`` runs anyway and flags the output) and pins ``--threads`` (2 by default). Inputs are random
tensors: the cost of a step does not depend on pixel values.

    python benchmarks/csg_cost.py                       # batch 128 and 32, 3 repeats of 5 steps, 2 threads
    python benchmarks/csg_cost.py --batch 128 --repeats 5 --json out.json
    python benchmarks/csg_cost.py --device cuda --amp --channels-last --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks.bench_common import (  # noqa: E402
    GOAL_BATCH,
    StepOptions,
    TrainStep,
    add_common_arguments,
    ratio_to,
    record_gate,
    set_threads,
    time_interleaved,
)
from models.csg import csg_layers  # noqa: E402

GOAL = 1.10


def build_variants(model: str, bcsg_code_size: int, seed: int) -> dict[str, nn.Module]:
    """The five models compared, built from one seed (dense first: ratios are taken to it)."""
    torch.manual_seed(seed)
    dense = models.build(model)
    donor = models.csg_compress(models.build("resnet20"), slice_shape=(16, 16, 3, 3), code_size=128)
    return {
        "dense": dense,
        "CSG-[16,16,3,3]-128": models.csg_compress(dense, (16, 16, 3, 3), 128),
        "CSG-[12,12,3,3]-72": models.csg_compress(dense, (12, 12, 3, 3), 72),
        "CSG-128 frozen shared (resnet20)": models.csg_compress(dense, (16, 16, 3, 3), 128, generator=donor,
                                                                train_generator=False),
        f"BCSG-[16,16,3,3]-{bcsg_code_size}": models.csg_compress(dense, (16, 16, 3, 3), bcsg_code_size,
                                                                  binary=True),
    }


def payload_split(net: nn.Module) -> tuple[int, int]:
    """(header bytes, data bytes) of the serialized trainable state (safetensors: u64 length + JSON header)."""
    blob = models.serialize_state(models.trainable_state(net))
    header = 8 + int.from_bytes(blob[:8], "little")
    return header, len(blob) - header


def generation_time(net: nn.Module, reps: int) -> float:
    """Median seconds to regenerate all CSG filters and backprop into codes/generator: CSG's only extra work."""
    layers = [m for _, m in csg_layers(net)]
    if not layers:
        return 0.0

    def once() -> None:
        sum(m.generate().sum() for m in layers).backward()
        net.zero_grad(set_to_none=True)

    once()
    return statistics.median(time_call(once) for _ in range(reps))


def time_call(fn) -> float:  # noqa: ANN001 - any zero-argument callable
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    add_common_arguments(ap)
    ap.add_argument("--gen-reps", type=int, default=5, help="repetitions of the isolated generation timing")
    ap.add_argument("--bcsg-code-size", type=int, default=1024, help="the paper's ResNet-56 BCSG row uses 1024")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.set_defaults(steps=5, warmup=1)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    banner = record_gate(args)

    variants = build_variants(args.model, args.bcsg_code_size, args.seed)
    dense_name = next(iter(variants))
    dense_params = models.count_params(variants[dense_name])
    dense_bytes = models.payload_bytes(variants[dense_name])
    dense_data = payload_split(variants[dense_name])[1]
    static = []
    for name, net in variants.items():
        params = models.count_params(net)
        header, data = payload_split(net)
        static.append({
            "variant": name,
            "params": params,
            "param_ratio": params / dense_params,
            "travelling_numel": models.count_params(net, include_buffers=True),
            "payload_bytes": header + data,
            "payload_ratio": (header + data) / dense_bytes,
            "header_bytes": header,
            "data_ratio": data / dense_data,
            "payload_bytes_fp16": models.payload_bytes(net, "fp16"),
            "fp16_ratio": models.payload_bytes(net, "fp16") / dense_bytes,
            "generation_s": generation_time(net, args.gen_reps),
        })
    print(f"{args.model}, device={args.device} threads={threads} amp={args.amp} channels_last={args.channels_last} "
          f"repeats={args.repeats} steps={args.steps} warmup={args.warmup}; ratios are variant / dense")
    head = (f"{'variant':34s} {'params':>9s} {'ratio':>7s} {'payload B':>10s} {'ratio':>7s} {'header B':>9s} "
            f"{'data r':>7s} {'fp16 B':>9s} {'ratio':>7s}")
    print(head)
    print("-" * len(head))
    for r in static:
        print(f"{r['variant']:34s} {r['params']:9,d} {r['param_ratio']:7.4f} {r['payload_bytes']:10,d} "
              f"{r['payload_ratio']:7.4f} {r['header_bytes']:9,d} {r['data_ratio']:7.4f} "
              f"{r['payload_bytes_fp16']:9,d} {r['fp16_ratio']:7.4f}")
    print("payload = safetensors header (8 B + JSON naming each tensor) + fp32 data of parameters and BN running "
          "stats; 'data r' is the data-only ratio (travelling elements), 'fp16' ratios are to dense fp32.")

    timing = []
    for batch in args.batch:
        opts = StepOptions(args.device, batch, args.amp, args.channels_last)
        steps = {name: TrainStep(net, opts, lr=0.05, weight_decay=5e-4, seed=args.seed)
                 for name, net in variants.items()}
        times = time_interleaved(steps, args.repeats, args.steps, args.warmup)
        for r in static:
            ratio = ratio_to(times[r["variant"]], times[dense_name])
            timing.append({"variant": r["variant"], "batch": batch, "step_s": ratio.step_s, "step_ratio": ratio.ratio,
                           "step_ratio_min": ratio.ratio_min, "step_ratio_max": ratio.ratio_max,
                           "generation_over_dense_step": r["generation_s"] / statistics.median(
                               statistics.median(rep) for rep in times[dense_name])})
    if banner:
        print(banner)
    head = (f"{'variant':34s} {'batch':>5s} {'step s':>7s} {'step x [range]':>21s} {'gen +':>6s}  "
            f"goal (<= {GOAL} at batch {GOAL_BATCH})")
    print(head)
    print("-" * len(head))
    for t in timing:
        verdict = "met" if t["step_ratio"] <= GOAL else "MISSED"
        print(f"{t['variant']:34s} {t['batch']:5d} {t['step_s']:7.3f} {t['step_ratio']:7.3f} "
              f"[{t['step_ratio_min']:.3f}-{t['step_ratio_max']:.3f}] {t['generation_over_dense_step']:6.1%}  "
              f"{'' if t['variant'] == dense_name or t['batch'] != GOAL_BATCH else verdict}")
    print("'gen +': regenerating all CSG filters + their backward alone (the extra work per step), as a fraction "
          "of the dense step at that batch size.")
    if banner:
        print(banner)
    print(f"load average after the run {os.getloadavg()[0]:.2f} (includes this run's own {threads} threads)")
    result = {"model": args.model, "threads": threads, "forced": bool(banner), "rows": static, "timing": timing}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
