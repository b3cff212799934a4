"""Moonshine on real CIFAR-10: a WRN-16-1 teacher, then WRN-16-1 ``G(4)`` students without distillation,
with KD and with AT, at equal epochs, all through the pipeline's own pieces (config, teacher stage,
``build_training_model`` -> ``cheapen``, ``build_loss``, the shared ``fit`` loop, ``evaluate``).

For each seed the three students start from identical weights and see the same batches in the same order;
only the loss differs (``--student-seeds 0 1 2`` repeats them with one teacher and reports means). Prints
accuracies, parameter counts (with and without BN running statistics, the latter being Moonshine's
convention) and the gains of KD / AT over no distillation. The teacher is saved under ``--out`` and reused
by later runs with the same teacher settings.

    python benchmarks/distill.py                  # 5k train images, 3 (teacher 6) epochs; CPU: 10-15 min
    python benchmarks/distill.py --student-seeds 1 2               # more seeds, same (saved) teacher
    python benchmarks/distill.py --train-limit 50000 --epochs 30 --device cuda   # full training set
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("none", "kd", "at")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=REPO / "data" / "cifar10",
                   help="folder holding cifar-10-batches-py/ (write it with ../shared/data/cifar10.py)")
    p.add_argument("--train-limit", type=int, default=5000, help="first N training images (default 5000)")
    p.add_argument("--test-limit", type=int, default=2000, help="first N test images (default 2000)")
    p.add_argument("--epochs", type=int, default=3, help="student epochs (all three students)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="teacher epochs (default: 2 x --epochs, so the teacher is ahead of its students)")
    p.add_argument("--teacher", default="wrn-16-1")
    p.add_argument("--block", default="G(4)", help="student block SPEC (Moonshine notation)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="disable crop+flip augmentation")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher (and of the students by default)")
    p.add_argument("--student-seeds", type=int, nargs="+", default=None,
                   help="train the three students once per seed (same teacher); the table shows means")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared, busy CPU more threads oversubscribe the cores)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-distill", help="teacher is saved here")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def teacher_epochs(args: argparse.Namespace) -> int:
    return args.teacher_epochs or 2 * args.epochs


def base_config(args: argparse.Namespace) -> dict:
    """The shared part of every run's config (data, schedule, seed)."""
    return {
        "seed": args.seed, "device": args.device, "output": str(args.out), "name": "distill",
        "data": {"root": str(args.root), "train_limit": args.train_limit, "test_limit": args.test_limit,
                 "augment": not args.no_augment},
        "model": {"name": args.teacher},
        "train": {"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": args.batch_size,
                  "epochs": args.epochs, "schedule": "cosine", "eval_batch_size": 500},
        "teacher": {"model": {"name": args.teacher},
                    "train": {"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": args.batch_size,
                              "epochs": teacher_epochs(args), "schedule": "cosine"}},
    }


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    import models
    from pipeline.config import config_from_dict
    from pipeline.data import test_loader, train_loader
    from pipeline.distill import build_loss
    from pipeline.modeling import build_training_model
    from pipeline.teacher import get_teacher
    from pipeline.train import evaluate, fit, resolve_device

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.root / "cifar-10-batches-py" / "test_batch").is_file():
        raise SystemExit(f"no CIFAR-10 under {args.root}: run python ../shared/data/cifar10.py {args.root}")
    raw = base_config(args)
    device = resolve_device(args.device)
    cfg0 = config_from_dict(raw)
    reused = (args.out / "distill" / "teacher" / "model.json").is_file()
    start = time.perf_counter()
    teacher = get_teacher(cfg0, device)  # trains and saves it, or reuses a copy saved with the same settings
    teacher_seconds = time.perf_counter() - start
    loader_test = test_loader(cfg0)
    counted = models.build_from_spec(models.model_spec(teacher))  # the frozen teacher has no trainable params
    rows = [{"run": f"teacher {args.teacher} S", "params": models.count_params(counted),
             "params_bn": models.count_params(counted, include_buffers=True),
             "accuracy": evaluate(teacher, loader_test, device)["test_accuracy"], "seconds": teacher_seconds}]
    how = "possibly reused from " + str(args.out) if reused else "trained"
    print(f"teacher {args.teacher}: accuracy {rows[0]['accuracy']:.4f} ({teacher_seconds:.0f} s, {how})", flush=True)

    seeds = args.student_seeds or [args.seed]
    for seed in seeds:
        for kind in KINDS:
            cfg = config_from_dict({**raw, "seed": seed, "compression": {"kind": "cheap", "block": args.block},
                                    "distill": {"kind": kind}})
            student = build_training_model(cfg).to(device)
            t0 = time.perf_counter()
            fit(student, train_loader(cfg), cfg.train, loss_fn=build_loss(cfg.distill, teacher), device=device)
            seconds = time.perf_counter() - t0
            acc = evaluate(student, loader_test, device)["test_accuracy"]
            rows.append({"run": f"student {args.block} {kind}", "kind": kind, "seed": seed,
                         "params": models.count_params(student),
                         "params_bn": models.count_params(student, include_buffers=True), "accuracy": acc,
                         "seconds": seconds})
            print(f"student {args.block} distill={kind} seed={seed}: accuracy {acc:.4f} ({seconds:.0f} s)", flush=True)

    print(f"\nCIFAR-10, {args.train_limit} train / {args.test_limit} test images, {args.epochs} student epochs, "
          f"teacher {teacher_epochs(args)} epochs, augment={not args.no_augment}, device={device}, "
          f"student seeds {seeds}")
    print(f"{'run':<28}{'params':>10}{'params+BN':>11}{'ratio':>7}{'accuracy':>10}{'vs none':>9}{'seconds':>9}")
    summary = [dict(rows[0], vs_none=None)]
    for kind in KINDS:
        mine = [r for r in rows[1:] if r["kind"] == kind]
        summary.append({**mine[0], "accuracy": statistics.mean(r["accuracy"] for r in mine),
                        "seconds": statistics.mean(r["seconds"] for r in mine)})
    for r in summary[1:]:
        r["vs_none"] = r["accuracy"] - summary[1]["accuracy"]
    for r in summary:
        ratio = r["params_bn"] / summary[0]["params_bn"]
        gain = "" if r["vs_none"] is None else f"{100 * r['vs_none']:+.2f}pt"
        print(f"{r['run']:<28}{r['params']:>10,}{r['params_bn']:>11,}{ratio:>7.3f}{r['accuracy']:>10.4f}"
              f"{gain:>9}{r['seconds']:>9.0f}")
    if len(seeds) > 1:
        print("(student accuracy and seconds: means over the seeds; per-seed values are printed above)")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "summary": summary}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
