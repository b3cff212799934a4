"""Does the update screen's direction check leave honest clients alone? Honest (and one sign-flipped) runs on
skewed splits, with sparse top-k codec updates and with few replies per round.

Each case runs the real ServerApp body in-process (``server.local_grid.LocalGrid``) with the default update
screen and records, per round, every reply's cosine with the other replies' median update (the number the
check compares with ``-backward_ratio`` x the agreement), the round's median cosine (the agreement, gated by
``min_agreement`` and ``agreement_over_spread``) and the replies the screen dropped. Data: the embedded
CIFAR-10 subset (1,500 train / 500 test), SmallNet-3, 5 rounds x 5 batches of 32, lr 0.1.

    python benchmarks/direction_check.py                       # every case, honest and sign-flipped x5
    python benchmarks/direction_check.py --cases iid "dirichlet 0.1" --attacks honest
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import server.strategies as strategies  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from server.local_grid import LocalGrid  # noqa: E402
from server.runner import run_server  # noqa: E402
from tests.hostile_clients import ATTACKS, hostile_app  # noqa: E402

TOPK = {"codec": ["topk(frac=0.01)"], "error_feedback": True}
#: case -> (clients, data.partition, extra engine keys, transport)
CASES: dict[str, tuple[int, dict, dict, dict | None]] = {
    "iid": (5, {"kind": "iid"}, {}, None),
    "dirichlet 0.1": (5, {"kind": "dirichlet", "alpha": 0.1}, {}, None),
    "shards": (5, {"kind": "shards"}, {}, None),
    "10 clients, dirichlet 0.1": (10, {"kind": "dirichlet", "alpha": 0.1}, {}, None),
    "top-k 1% + EF, iid": (5, {"kind": "iid"}, {}, TOPK),
    "top-k 1% + EF, dirichlet 0.3": (5, {"kind": "dirichlet", "alpha": 0.3}, {}, TOPK),
    "fraction 0.6 (3 of 5), dirichlet 0.1": (5, {"kind": "dirichlet", "alpha": 0.1}, {"fraction": 0.6}, None),
}


def run_case(name: str, attack: str | None, out: Path) -> dict:
    """One run with the default screen: final accuracy, per-round cosines and how many replies were dropped."""
    clients, partition, engine, transport = CASES[name]
    raw = {"name": "direction", "seed": 0, "device": "cpu", "output": str(out),
           "data": {"train_limit": 1500, "test_limit": 500, "augment": False, "partition": partition},
           "model": {"name": "smallnet3"},
           "engine": {"kind": "flower", "rounds": 5, "clients": clients, "min_train_nodes": 1, **engine},
           "train": {"batch_size": 32, "lr": 0.1, "max_batches": 5, "eval_batch_size": 500}}
    if transport:
        raw["transport"] = transport
    cfg = config_from_dict(raw)
    rounds: list[list] = []
    screen = strategies.screen_updates

    def recording(*args, **kwargs):
        results = screen(*args, **kwargs)
        rounds.append(results)
        return results

    strategies.screen_updates = recording  # measurement only: the screen itself runs unchanged
    try:
        attacker = clients - 1
        app = hostile_app(train={attacker: ATTACKS[attack]} if attack else None)
        acc = float(run_server(LocalGrid(app, clients), cfg, cfg.run_dir)["test_accuracy"])
    finally:
        strategies.screen_updates = screen
    cos = [r.cosine for rnd in rounds for r in rnd if r.cosine is not None]
    agreement = [statistics.median(r.cosine or 0.0 for r in rnd) for rnd in rounds if rnd[0].cosine is not None]
    dropped = sum(r.action == "dropped" and "points against" in (r.reason or "") for rnd in rounds for r in rnd)
    return {"accuracy": acc, "replies": [len(rnd) for rnd in rounds], "min_cos": min(cos, default=None),
            "agreement": agreement, "dropped": dropped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--attacks", nargs="*", default=["honest", "sign-flipped x5"],
                        choices=["honest", *ATTACKS])
    parser.add_argument("--out", type=Path, default=Path("/tmp/compactfl-direction"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    print("| case | run | replies/round | min cosine | round agreement (median cosine) | dropped by direction "
          "| accuracy |")
    print("|---|---|---|---:|---|---:|---:|")
    for name in args.cases:
        for attack in args.attacks:
            # a folder per run: codec runs keep per-node error-feedback residuals under the run directory
            folder = args.out / "".join(c if c.isalnum() else "_" for c in f"{name}-{attack}")
            r = run_case(name, None if attack == "honest" else attack, folder)
            low = "-" if r["min_cos"] is None else f"{r['min_cos']:.2f}"
            agree = " ".join(f"{a:.2f}" for a in r["agreement"]) or "- (fewer than 4 replies)"
            print(f"| {name} | {attack} | {min(r['replies'])}-{max(r['replies'])} | {low} | {agree} | "
                  f"{r['dropped']} | {r['accuracy']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
