"""CSG cost benchmark: parameters, payload bytes and CPU train-step time of ResNet-56 variants, side by side.

Rows: dense, CSG [16,16,3,3]-128, CSG [12,12,3,3]-72, CSG-128 with a frozen generator shared from a
ResNet-20 CSG model (the paper's "pre-trained CSG" row), BCSG (binary frozen generator, the paper's n_c=1024).
Step times are measured round-robin (one step of every variant per round) so load drift on a shared machine
hits all variants alike; the reported ratio is the median of per-round ratios to dense. Inputs are random
tensors: the cost of a step does not depend on pixel values.

    python benchmarks/csg_cost.py                       # batch 128, 3 timed rounds, 1 thread (~10 min here)
    python benchmarks/csg_cost.py --rounds 10 --threads 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.csg import csg_layers  # noqa: E402


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


def make_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A closure doing one SGD training step (the paper's optimizer settings) on ``net``."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    return step


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


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (one step of every variant each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gen-reps", type=int, default=5, help="repetitions of the isolated generation timing")
    ap.add_argument("--bcsg-code-size", type=int, default=1024, help="the paper's ResNet-56 BCSG row uses 1024")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). 1 by default: on an oversubscribed machine multi-thread "
                         "OpenMP barriers make CSG's many small generation ops pathologically slow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = build_variants(args.model, args.bcsg_code_size, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    steps = {name: make_step(net, x, y) for name, net in variants.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_call(step))

    dense_name = next(iter(variants))
    dense_params = models.count_params(variants[dense_name])
    dense_bytes = models.payload_bytes(variants[dense_name])
    dense_data = payload_split(variants[dense_name])[1]
    rows = []
    for name, net in variants.items():
        params = models.count_params(net)
        header, data = payload_split(net)
        step_ratios = [t / d for t, d in zip(times[name], times[dense_name], strict=True)]
        rows.append({
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
            "step_s_median": statistics.median(times[name]),
            "step_ratio": statistics.median(step_ratios),
            "generation_s": generation_time(net, args.gen_reps),
        })
    dense_step = rows[0]["step_s_median"]
    for r in rows:
        r["generation_over_dense_step"] = r["generation_s"] / dense_step

    print(f"{args.model}, batch {args.batch_size}, CPU ({torch.get_num_threads()} threads), "
          f"{args.rounds} round(s) after {args.warmup} warm-up; ratios are variant / dense")
    head = (f"{'variant':34s} {'params':>9s} {'ratio':>7s} {'payload B':>10s} {'ratio':>7s} {'header B':>9s} "
            f"{'data r':>7s} {'fp16 B':>9s} {'ratio':>7s} {'step s':>7s} {'ratio':>7s} {'gen s':>6s} {'+step':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:34s} {r['params']:9,d} {r['param_ratio']:7.4f} {r['payload_bytes']:10,d} "
              f"{r['payload_ratio']:7.4f} {r['header_bytes']:9,d} {r['data_ratio']:7.4f} "
              f"{r['payload_bytes_fp16']:9,d} {r['fp16_ratio']:7.4f} {r['step_s_median']:7.3f} {r['step_ratio']:7.3f} "
              f"{r['generation_s']:6.3f} {r['generation_over_dense_step']:6.1%}")
    print("payload = safetensors header (8 B + JSON naming each tensor) + fp32 data of parameters and BN running "
          "stats; 'data r' is the data-only ratio (travelling elements), 'fp16' ratios are to dense fp32.\n"
          "'gen s': regenerating all CSG filters + their backward alone (the extra work per step), "
          "'+step': that as a fraction of the dense step (less sensitive to load drift than the step ratio).")
    result = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
