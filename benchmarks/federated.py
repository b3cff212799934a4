"""Federated benchmark: dense vs CSG vs CSG+bf16 vs ExpandNets-CK, and Flower's orchestration overhead.

SmallNet-7, N clients on a Dirichlet(alpha) split, R rounds of FedAvg with E local epochs. For every variant
the real ServerApp body and ClientApp run through ``LocalGrid`` (Flower messages in-process; the Ray
simulation computes bit-identical weights, see tests/engines/test_flower_sim.py) and we report the accuracy of the
deployed compact model after R rounds and the bytes measured on the ArrayRecord payloads. Then, for the
dense variant, the same training runs three ways:
  flower-ray  : ``pipeline.engines.flower.run_flower`` (Flower simulation runtime, Ray actors)
  flower-local: the ServerApp/ClientApp over ``LocalGrid`` (Flower messages, no Ray)
  plain loop  : an in-process FedAvg loop calling the same ``local_train`` and averaging tensors
and the wall-time ratios are Flower's orchestration overhead (with and without Ray start-up).

    python benchmarks/federated.py                      # short default (embedded CIFAR-10 subset)
    python benchmarks/federated.py --data-root data/cifar10 --train-limit 50000 --rounds 20 --local-epochs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models  # noqa: E402
from clients.app import app as client_app  # noqa: E402
from clients.flower_client import local_train  # noqa: E402
from pipeline.config import RunConfig, config_from_dict  # noqa: E402
from pipeline.modeling import build_training_model  # noqa: E402
from server.local_grid import LocalGrid  # noqa: E402
from server.runner import CentralEvaluator, round_lrs, run_server  # noqa: E402

VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "dense": ({"kind": "none"}, "fp32"),
    "csg": ({"kind": "csg", "slice_shape": [8, 8, 7, 7], "code_size": 32, "train_generator": False}, "fp32"),
    "csg+bf16": ({"kind": "csg", "slice_shape": [8, 8, 7, 7], "code_size": 32, "train_generator": False}, "bf16"),
    "expand-ck": ({"kind": "expand", "strategy": "ck", "rate": 4}, "fp32"),
}


def make_config(args: argparse.Namespace, variant: str, out: Path) -> RunConfig:
    """The run config of one variant (same data, split, seed and schedule for all)."""
    compression, dtype = VARIANTS[variant]
    return config_from_dict({
        "name": variant.replace("+", "-"), "seed": args.seed, "device": "cpu", "output": str(out),
        "data": {"root": args.data_root, "train_limit": args.train_limit, "test_limit": args.test_limit,
                 "partition": {"kind": "dirichlet", "alpha": args.alpha, "min_size": 10}},
        "model": {"name": args.model}, "compression": compression,
        "engine": {"kind": "flower", "rounds": args.rounds, "clients": args.clients, "min_train_nodes": 1,
                   "local_epochs": args.local_epochs, "strategy": "fedavg"},
        # the plain loop averages whole trainable states: ExpandNets send their factors in both (like with like)
        "transport": {"dtype": dtype, **({"communicate": "factors"} if compression["kind"] == "expand" else {})},
        "train": {"batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4,
                  "eval_batch_size": 500},
    })


def plain_fedavg(cfg: RunConfig) -> tuple[list[float], float, dict[str, float]]:
    """FedAvg without orchestration: the same local_train calls, weighted tensor averages in-process.

    Returns (seconds of training + aggregation per round, total seconds incl. evaluation, final test metrics).
    """
    start = time.perf_counter()
    model = build_training_model(cfg)
    evaluator = CentralEvaluator(cfg, model)
    state = {k: v.detach().clone().float() for k, v in models.trainable_state(model).items()}
    n = cfg.engine.clients
    result: dict[str, float] = {}
    per_round = []
    for rnd in range(1, cfg.engine.rounds + 1):
        t0 = time.perf_counter()
        lrs = round_lrs(cfg, rnd)
        replies = [local_train(cfg, state, partition_id=p, num_partitions=n, server_round=rnd, lrs=lrs)
                   for p in range(n)]
        total = sum(m["num-examples"] for _, m in replies)
        state = {k: sum(s[k] * (m["num-examples"] / total) for s, m in replies) for k in state}
        per_round.append(time.perf_counter() - t0)
        result = evaluator(state)
    return per_round, time.perf_counter() - start, result


def run_variants(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows = []
    for variant in args.variants:
        cfg = make_config(args, variant, out)
        start = time.perf_counter()
        summary = run_server(LocalGrid(client_app, cfg.engine.clients), cfg, cfg.run_dir)
        history = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["history"]
        rows.append({"variant": variant, "accuracy": summary["test_accuracy"], "bytes_up": summary["bytes_up"],
                     "round_seconds": [r["seconds"] for r in history],
                     "bytes_down": summary["bytes_down"], "upload_per_client": summary["payload_bytes_up_per_client"],
                     "params_train": summary["params_train"], "params_deploy": summary["params_deploy"],
                     "seconds": time.perf_counter() - start})
        print(f"  {variant:10s} acc {summary['test_accuracy']:.4f}  up {summary['bytes_up']:>11,d} B  "
              f"down {summary['bytes_down']:>11,d} B  ({rows[-1]['seconds']:.1f} s)", flush=True)
    return rows


def overhead(args: argparse.Namespace, out: Path, local_row: dict[str, Any] | None) -> dict[str, float]:
    """Wall time of the dense variant under the Ray simulation, LocalGrid and a plain loop."""
    from pipeline.engines.flower import run_flower

    cfg = make_config(args, "dense", out)
    plain_rounds, plain_total, plain_eval = plain_fedavg(cfg)
    res: dict[str, Any] = {"plain_round_seconds": plain_rounds, "plain_seconds": plain_total,
                             "plain_accuracy": plain_eval["test_accuracy"]}
    if local_row is not None:
        res["flower_local_seconds"] = local_row["seconds"]
        res["flower_local_round_seconds"] = local_row["round_seconds"]
    if not args.skip_ray:
        ray_cfg = make_config(args, "dense", out / "ray")
        start = time.perf_counter()
        summary = run_flower(ray_cfg, ray_cfg.run_dir, ray_cpus=args.ray_cpus)
        res["flower_ray_seconds"] = time.perf_counter() - start
        history = json.loads((Path(ray_cfg.run_dir) / "metrics.json").read_text())["history"]
        res["flower_ray_round_seconds"] = [r["seconds"] for r in history]
        res["flower_ray_accuracy"] = summary["test_accuracy"]
    return res


def _later(seconds: list[float]) -> float | None:
    return sum(seconds[1:]) / len(seconds[1:]) if len(seconds) > 1 else None


def _rounds(seconds: list[float]) -> str:
    later = _later(seconds)
    return f"{seconds[0]:7.2f} s | " + (f"{later:7.2f} s" if later is not None else "    n/a")


def _ratio(seconds: list[float], plain: list[float]) -> str:
    first = f"{seconds[0] / plain[0]:.2f}x"
    later, plain_later = _later(seconds), _later(plain)
    return first + (f" | {later / plain_later:.2f}x" if later is not None and plain_later else "")


def warm_up(args: argparse.Namespace, out: Path) -> None:
    """Decode the data and warm torch up once, so the first timed variant is not penalised."""
    cfg = make_config(args, "dense", out / "warmup")
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"rounds": 1})})
    plain_fedavg(cfg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallnet7")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--data-root", default=None, help="CIFAR-10 folder (default: the embedded subset)")
    p.add_argument("--train-limit", type=int, default=2400)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--skip-ray", action="store_true", help="skip the Ray simulation timing")
    p.add_argument("--ray-cpus", type=int, default=1,
                   help="CPUs Ray may use (1 = one client at a time, like the plain loop; more = parallel clients)")
    p.add_argument("--out", default=None, help="keep run dirs here (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # Ray actors get 1 CPU each: compare like with like
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        print(f"{args.model}, {args.clients} clients Dirichlet({args.alpha}), {args.rounds} rounds x "
              f"{args.local_epochs} local epochs, train samples {args.train_limit}, data "
              f"{args.data_root or 'embedded subset'}", flush=True)
        warm_up(args, out)
        rows = run_variants(args, out)
        base = next((r for r in rows if r["variant"] == "dense"), rows[0])
        print("\nvariant     accuracy  upload/client B  vs dense  total bytes (up+down)")
        for r in rows:
            total = r["bytes_up"] + r["bytes_down"]
            print(f"{r['variant']:10s}  {r['accuracy']:.4f}   {r['upload_per_client']:>13,d}  "
                  f"{base['upload_per_client'] / r['upload_per_client']:7.2f}x  {total:>14,d}")
        ov = overhead(args, out, base if base["variant"] == "dense" else None)
        plain = ov["plain_round_seconds"]
        print("\norchestration, dense variant, same training; seconds per round = training + aggregation "
              "(no evaluation), round 1 | mean of later rounds:")
        print(f"  plain in-process FedAvg loop : {_rounds(plain)}   total {ov['plain_seconds']:7.1f} s"
              f"   accuracy {ov['plain_accuracy']:.4f}")
        paths = (("Flower messages (LocalGrid)", "flower_local_round_seconds", "flower_local_seconds"),
                 ("Flower simulation (Ray)    ", "flower_ray_round_seconds", "flower_ray_seconds"))
        for label, key, total_key in paths:
            if key in ov:
                print(f"  {label}  : {_rounds(ov[key])}   total {ov[total_key]:7.1f} s   ratio {_ratio(ov[key], plain)}"
                      f"   total ratio {ov[total_key] / ov['plain_seconds']:.2f}x")
        print(json.dumps({"variants": rows, "overhead": ov}, default=float))


if __name__ == "__main__":
    main()
