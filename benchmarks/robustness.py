"""Federated robustness table: test accuracy with one hostile client among five, per server configuration.

The real ServerApp body (``server.runner.run_server``) runs in-process on ``server.local_grid.LocalGrid``
with the real ClientApp wrapped by ``tests/hostile_clients.py`` (no production config knob): one
partition (``--attacker``) replies with a scaled, sign-flipped or num-examples-inflating update. Data: the
embedded CIFAR-10 subset (real images), IID over 5 clients, SmallNet-3. Rows: server configurations;
columns: honest run and each attack; cells: final test accuracy (mean over ``--seeds``).

    python benchmarks/robustness.py                          # 5 rounds x 5 batches, 1 seed (~5 min on 2 cores)
    python benchmarks/robustness.py --seeds 0 1 --factor 1.5 --json out.json
    python benchmarks/robustness.py --codec --seeds 0 1     # uploads through top-k 10% + 8-bit + EF

``--codec [CHAIN]``: every client uploads its update through ``CHAIN`` with error feedback (default
``[topk(frac=0.1), qsgd(bits=8, block=256)]``); the attacker decodes its encoded reply, scales the update and
re-encodes it with the same chain (``ModelAttack.tamper_encoded``), so the server screens it decoded. Rows:
FedAvg as shipped, the default, and the default with the direction check off (the norm screen alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import config_from_dict  # noqa: E402
from server.local_grid import LocalGrid  # noqa: E402
from server.runner import run_server  # noqa: E402
from tests.hostile_clients import ATTACKS, hostile_app  # noqa: E402

CLIENTS = 5
CODEC = "[topk(frac=0.1), qsgd(bits=8, block=256)]"


def server_configs(factor: float) -> dict[str, dict]:
    """Row name -> engine keys. 'fedavg (screen off)' is Flower's FedAvg as shipped: claimed weights, no screen."""
    clip = {"kind": "clip", "factor": factor}
    return {
        "fedavg (screen off)": {"strategy": "fedavg", "update_screen": {"kind": "off", "direction": "off"},
                                "example_weights": "claimed"},
        f"default (fedavg + clip {factor:g}x + direction drop)": {"update_screen": {**clip, "direction": "drop"}},
        f"fedavg + centred clip {factor:g}x": {"update_screen": {"kind": "centred", "factor": factor,
                                                                  "direction": "off"}},
        f"fedavg + clip {factor:g}x (direction off)": {"update_screen": {**clip, "direction": "off"}},
        f"fedavg + drop {factor:g}x (direction off)": {"update_screen": {"kind": "drop", "factor": factor,
                                                                          "direction": "off"}},
        "fedmedian": {"strategy": "fedmedian"},
        "krum (f=1)": {"strategy": "krum", "krum_byzantine": 1},
        "multikrum (f=1)": {"strategy": "multikrum", "krum_byzantine": 1},
    }


def codec_server_configs(factor: float) -> dict[str, dict]:
    """The rows of ``--codec``: FedAvg as shipped, the default, the default with the direction check off."""
    dense = server_configs(factor)
    keep = ("fedavg (screen off)", f"default (fedavg + clip {factor:g}x + direction drop)",
            f"fedavg + clip {factor:g}x (direction off)")
    return {row: dense[row] for row in keep}


def run_config(engine: dict, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """The run config of one cell (everything but the engine keys is shared by the whole table)."""
    return {
        "name": "robustness", "seed": seed, "device": "cpu", "output": str(out),
        "data": {"train_limit": args.train_limit, "test_limit": args.test_limit, "augment": False,
                 "partition": {"kind": "iid"}},
        "model": {"name": "smallnet3"},
        "engine": {"kind": "flower", "rounds": args.rounds, "clients": CLIENTS, "min_train_nodes": 1, **engine},
        "train": {"batch_size": 32, "lr": args.lr, "max_batches": args.max_batches, "eval_batch_size": 500},
        **({"transport": {"codec": args.codec, "error_feedback": True}} if args.codec else {}),
    }


def accuracy(engine: dict, attack: str | None, seed: int, args: argparse.Namespace, out: Path) -> float:
    """Final test accuracy of one run (attack None: every client honest)."""
    cfg = config_from_dict(run_config(engine, seed, args, out))
    # every cell is a fresh run: a codec run's node stores (error-feedback residuals) must not carry over
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    app = hostile_app(train={args.attacker: ATTACKS[attack]} if attack else None)
    return float(run_server(LocalGrid(app, CLIENTS), cfg, cfg.run_dir)["test_accuracy"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batches", type=int, default=5, help="local batches of 32 per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-limit", type=int, default=1500)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--factor", type=float, default=1.5, help="update screen bound (x round median norm)")
    parser.add_argument("--attacker", type=int, default=4, help="partition id of the hostile client")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="*", default=None, help="subset of row names (default: all)")
    parser.add_argument("--columns", nargs="*", default=None, help="subset of honest and attack names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/compactfl-robustness"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--codec", nargs="?", const=CODEC, default=None,
                        help=f"upload updates through this codec chain with error feedback (default {CODEC})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # per-round lines and Flower's chatter; the table is the output

    configs = codec_server_configs(args.factor) if args.codec else server_configs(args.factor)
    rows = {k: v for k, v in configs.items() if args.rows is None or k in args.rows}
    columns: list[str | None] = [c for c in [None, *ATTACKS] if args.columns is None or (c or "honest") in args.columns]
    started = time.perf_counter()
    table: dict[str, dict[str, float]] = {}
    for row, engine in rows.items():
        table[row] = {}
        for attack in columns:
            accs = [accuracy(engine, attack, seed, args, args.out) for seed in args.seeds]
            table[row][attack or "honest"] = statistics.mean(accs)
            print(f"  {row:<34} {attack or 'honest':<30} {table[row][attack or 'honest']:.3f}", file=sys.stderr)
    names = [c or "honest" for c in columns]
    print(f"\n5 clients (IID, embedded CIFAR-10 subset, {args.train_limit} train / {args.test_limit} test images), "
          f"SmallNet-3, {args.rounds} rounds x {args.max_batches} batches of 32, lr {args.lr}, attacker = "
          f"partition {args.attacker}, seeds {args.seeds}"
          f"{f', uploads {args.codec} + error feedback' if args.codec else ''}; final test accuracy (chance 0.10)\n")
    print("| server | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for row, cells in table.items():
        print(f"| {row} | " + " | ".join(f"{cells[n]:.3f}" for n in names) + " |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table},
                                        indent=1))


if __name__ == "__main__":
    main()
