"""Codec error on REAL client updates: ``||decode(encode(u)) - u|| / ||u||`` per chain, before error feedback.

A federated run's global model (a round checkpoint, ``--checkpoint``) is trained for one local epoch on
``--clients`` real CIFAR-10 partitions with the run's config; each update ``u`` (every trainable tensor but BN
running statistics) goes through each chain. The printed share of the update's energy that a chain loses per
round is what error feedback has to carry into later rounds: it separates the low-rank truncation from the
quantisation of the factors, stochastic from nearest rounding, and one matrix view from another. Beside it: the
bytes of the encoded tensors as they travel packed (mean over clients; no header, no BN running statistics).

    PYTHONPATH=. python benchmarks/codec_error.py --data-root /work/data/cifar10 \\
        --config configs/federated/pareto/smallnet7_dense.yaml \\
        --checkpoint runs/pareto/runs/smallnet7_dense-s0/checkpoints/round-0024.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from clients.flower_client import local_train  # noqa: E402
from models.state import BN_STAT_NAMES  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.transport.codecs import CodecContext, parse_chain  # noqa: E402

CHAINS = ["qsgd(bits=4,block=256)", "qsgd(bits=3,block=256)", "sign", "lowrank(rank=9)",
          "lowrank(rank=9)+qsgd(bits=3,block=256)", "lowrank(rank=9)+qsgd(bits=3,block=256,rounding=nearest)",
          "lowrank(rank=10)+qsgd(bits=3,block=256,rounding=nearest)",
          "lowrank(rank=7)+qsgd(bits=4,block=256,rounding=nearest)", "lowrank(rank=2)+qsgd(bits=4,block=256)",
          "lowrank(rank=2)+qsgd(bits=4,block=256,rounding=nearest)", "lowrank(rank=4,layout=kernel)",
          "lowrank(rank=4,layout=kernel)+qsgd(bits=3,block=256,rounding=nearest,entropy=deflate)",
          "lowrank(rank=5,layout=kernel)+qsgd(bits=3,block=256,rounding=nearest,entropy=deflate)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True, help="a round checkpoint of a run of --config")
    p.add_argument("--data-root", required=True)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--round", type=int, default=12, help="the round whose data order and seed the clients use")
    p.add_argument("--lr", type=float, default=0.03, help="the local learning rate (mid-schedule by default)")
    p.add_argument("--chains", nargs="+", default=CHAINS)
    args = p.parse_args()
    cfg = load_config(args.config, [f"data.root={args.data_root}"])
    saved = {k.removeprefix("global/"): v for k, v in load_file(args.checkpoint).items() if k.startswith("global/")}
    state = {k: saved[k] for k in models.trainable_state(models.build(cfg.model.name, num_classes=10))}
    updates = []
    for pid in range(args.clients):
        trained, _ = local_train(cfg, state, partition_id=pid, num_partitions=cfg.engine.clients,
                                 server_round=args.round, lrs=[args.lr])
        updates.append({k: trained[k].float() - state[k].float() for k in state
                        if k.rsplit(".", 1)[-1] not in BN_STAT_NAMES})
    print(f"| chain | relative squared error per round ({args.clients} clients, round {args.round}, lr {args.lr}) "
          "| codec bytes per client |")
    print("|---|---:|---:|")
    for spec in args.chains:
        chain = parse_chain(spec)
        lost = total = 0.0
        nbytes = 0
        for pid, update in enumerate(updates):
            for name, u in update.items():
                encoded = chain.encode(u, CodecContext(cfg.seed, args.round, pid, name))
                out = chain.decode(encoded)
                lost += float((out - u).pow(2).sum())
                total += float(u.pow(2).sum())
                nbytes += chain.to_bytes(encoded).numel()
        print(f"| `{spec}` | {lost / total:.3f} | {nbytes / len(updates):,.0f} |")


if __name__ == "__main__":
    main()
