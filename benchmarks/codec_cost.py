"""Codec cost: upload bytes and CPU encode + decode time of one model update under several codec chains.

The update is a random normal tensor per trainable tensor of the model (what travels does not depend on
the values for the fixed-size codecs; top-k index bytes depend on the support, which is random here, the
worst case for gap coding). Biases, BN and the classifier follow the ``transport.exclude`` rule given, BN
running statistics travel cast in ``--dtype``. Times are medians over ``--repeats``; print the load beside them.
Beside them, in the same run, one client's local round is timed with the project's training loop
(``--train-images`` CIFAR-shaped samples, batch 64, SGD): the codec's share of a round is
(encode + decode) / local training, the goal of issue #13 being < 5%. "On the Flower wire" is the bytes of the
ArrayRecord a node sends (the packed update, or the cast state without a codec), as the server counts them.

    python benchmarks/codec_cost.py                                  # smallnet7 and resnet20
    python benchmarks/codec_cost.py --models resnet56 --repeats 5 --json out.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from pipeline.config import TrainConfig, TransportConfig  # noqa: E402
from pipeline.train import build_optimizer, train_epoch  # noqa: E402
from pipeline.transport.codecs import CodecContext  # noqa: E402
from pipeline.transport.error_feedback import ErrorFeedback  # noqa: E402
from pipeline.transport.update import decode_encoded, encode_update  # noqa: E402
from pipeline.transport.wire import encode_state, record_nbytes, update_to_record  # noqa: E402

CHAINS = ["none", "bf16", "qsgd(bits=8,block=256)", "qsgd(bits=4,block=256)", "sign", "topk(frac=0.01)",
          "topk(frac=0.01)+qsgd(bits=8,block=256)", "lowrank(rank=4)+qsgd(bits=4,block=128)",
          "lowrank(rank=8)+qsgd(bits=3,block=256)", "lowrank(rank=7)+qsgd(bits=4,block=256,rounding=nearest)",
          "lowrank(rank=10)+qsgd(bits=3,block=256,rounding=nearest)",
          "lowrank(rank=2)+qsgd(bits=4,block=256,rounding=nearest)"]


def measure(model_name: str, chain: str, args: argparse.Namespace) -> dict:
    state = models.trainable_state(models.build(model_name, num_classes=10))
    gen = torch.Generator().manual_seed(0)
    update = {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in state.items()}
    t = TransportConfig(codec=chain, error_feedback=chain != "none", exclude=args.exclude, dtype=args.dtype)
    ef = ErrorFeedback() if t.error_feedback else None
    times, enc = [], None
    for r in range(1, args.repeats + 1):
        start = time.perf_counter()
        enc = encode_update(update, t, CodecContext(seed=0, round=r, partition=0), error_feedback=ef)
        decode_encoded(enc, t, round=r)
        times.append(time.perf_counter() - start)
    assert enc is not None
    dense = 4 * sum(v.numel() for v in update.values())
    # what the Flower record holds (buffers + keys): the packed update, or the state a codec-less node sends
    wire = record_nbytes(encode_state(update, t.dtype) if chain == "none" else update_to_record(enc))
    return {"model": model_name, "codec": chain, "bytes": enc.nbytes, "groups": enc.nbytes_by_group(),
            "factor_vs_fp32": round(dense / enc.nbytes, 1), "wire_bytes": wire,
            "encode_decode_ms": round(1e3 * statistics.median(times), 1)}


def local_round_seconds(model_name: str, images: int) -> float:
    """Wall seconds of one local epoch over ``images`` CIFAR-shaped samples (batch 64, SGD, the shared loop)."""
    torch.manual_seed(0)
    model = models.build(model_name, num_classes=10)
    x, y = torch.randn(images, 3, 32, 32), torch.randint(0, 10, (images,))
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, images, 64)]
    optimizer = build_optimizer(model, TrainConfig(lr=0.05, momentum=0.9, batch_size=64))
    return train_epoch(model, batches, optimizer).seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smallnet7", "resnet20"])
    p.add_argument("--chains", nargs="+", default=CHAINS)
    p.add_argument("--exclude", nargs="*", default=["*.bias"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-images", type=int, default=5000,
                   help="samples in the timed local round (5,000 = one of 10 CIFAR-10 clients' epoch)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train_ms = {m: 1e3 * local_round_seconds(m, args.train_images) for m in args.models}
    rows = [measure(m, c, args) for m in args.models for c in args.chains]
    for r in rows:
        r["local_round_ms"] = round(train_ms[r["model"]], 1)
        r["share_of_local_round_pct"] = round(100 * r["encode_decode_ms"] / train_ms[r["model"]], 2)
    load = os.getloadavg()[0]
    print(f"| model | codec | bytes | x fewer than fp32 | on the Flower wire | encode+decode ms | local round ms "
          f"({args.train_images} images) | share |  (load {load:.2f})")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | `{r['codec']}` | {r['bytes']:,} | {r['factor_vs_fp32']} | {r['wire_bytes']:,} "
              f"| {r['encode_decode_ms']} | {r['local_round_ms']:.0f} | {r['share_of_local_round_pct']}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
