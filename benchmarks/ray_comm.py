"""Gradient exchange on Ray Train: ResNet-56 on 2 CPU workers, dense vs compressed exchange vs CSG, side by side.

Variants: dense (fp32 allreduce), dense+fp16, dense+PowerSGD(r=2) (the peer baseline), CSG-128, CSG-128+bf16;
and on ``--expand-model`` (smallnet7): dense, ExpandNet-CK r=4 with factor sync (the chain's gradients in DDP's
buckets) and with compact sync (``transport.expand_sync: compact``: the compact dL/dW, dL/db, exact).
For each: trainable parameters, gradient bytes per step per rank (mean over the run and the last, steady-state
step: PowerSGD runs 2 plain warm-up steps), seconds per step, and test accuracy after the same fixed budget
(same data, epochs, batches and seed). Ratios are relative to dense. All runs share one local Ray instance.

    python benchmarks/ray_comm.py                          # short default (a few minutes on 2 CPUs)
    python benchmarks/ray_comm.py --train-limit 50000 --epochs 5 --test-limit 10000   # longer budget
    python benchmarks/ray_comm.py --variants smallnet7 smallnet7-ck4+factors smallnet7-ck4+compact

CIFAR-10: ``data/cifar10`` of the checkout when present, else a subset written with ``../shared/data/cifar10.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CSG128 = {"kind": "csg", "slice_shape": [16, 16, 3, 3], "code_size": 128}
CK4 = {"kind": "expand", "strategy": "ck", "rate": 4, "mode": "fused"}


class Variant(NamedTuple):
    """One benchmark row: compression section, ``transport.comm``, whether it runs on ``--expand-model``, and
    ``transport.expand_sync``."""

    compression: dict[str, Any]
    comm: str
    expand_model: bool = False
    expand_sync: str = "compact"


VARIANTS: dict[str, Variant] = {
    "dense": Variant({"kind": "none"}, "none"),
    "dense+fp16": Variant({"kind": "none"}, "fp16"),
    "dense+powersgd(2)": Variant({"kind": "none"}, "powersgd(2)"),
    "dense+topk1pct+q8+ef": Variant({"kind": "none"}, "topk(frac=0.01)+qsgd(bits=8,block=256)"),
    "csg-128": Variant(CSG128, "none"),
    "csg-128+bf16": Variant(CSG128, "bf16"),
    "smallnet7": Variant({"kind": "none"}, "none", expand_model=True),
    "smallnet7-ck4+factors": Variant(CK4, "none", expand_model=True, expand_sync="factors"),
    "smallnet7-ck4+compact": Variant(CK4, "none", expand_model=True, expand_sync="compact"),
}


def data_root(arg: str | None, per_class_train: int, per_class_test: int) -> Path:
    """The CIFAR-10 root to use: ``--data-root``, the checkout's data/cifar10, or a freshly written subset."""
    if arg:
        return Path(arg).resolve()
    local = REPO / "data" / "cifar10"
    if (local / "cifar-10-batches-py" / "test_batch").is_file():
        return local
    script = REPO.parent / "shared" / "data" / "cifar10.py"
    if not script.is_file():
        raise SystemExit(f"no CIFAR-10: pass --data-root or write it with {script} DEST")
    dest = Path(tempfile.mkdtemp(prefix="cifar10-"))
    subprocess.run([sys.executable, str(script), str(dest), "--per-class-train", str(per_class_train),
                    "--per-class-test", str(per_class_test)], check=True)
    return dest


def variant_config(name: str, args: argparse.Namespace, root: Path, out: Path) -> dict[str, Any]:
    v = VARIANTS[name]
    compression, comm = v.compression, v.comm
    return {
        "name": name.replace("+", "_").replace("(", "").replace(")", ""), "seed": args.seed, "output": str(out),
        "data": {"name": "cifar10", "root": str(root), "augment": True, "train_limit": args.train_limit,
                 "test_limit": args.test_limit},
        "model": {"name": args.expand_model if v.expand_model else args.model}, "compression": compression,
        "engine": {"kind": "ray", "workers": args.workers, "max_failures": 0},
        "transport": {"comm": comm, "error_feedback": comm.startswith(("topk", "qsgd", "sign")),
                      "expand_sync": v.expand_sync},
        "train": {"optimizer": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4,
                  "batch_size": args.batch_size, "epochs": args.epochs, "max_batches": args.max_batches},
    }


def measure(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run each variant on one local Ray instance; one row of measurements per variant."""
    import ray

    from pipeline.config import config_from_dict
    from pipeline.engines.ray import run_ray
    from pipeline.stages import prepare_run_dir

    root = data_root(args.data_root, args.per_class_train, args.per_class_test)
    out = Path(args.out).resolve()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    rows = []
    try:
        for name in names:
            cfg = config_from_dict(variant_config(name, args, root, out))
            t0 = time.perf_counter()
            summary = run_ray(cfg, prepare_run_dir(cfg))
            hist = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["history"]
            steps = sum(r["steps"] for r in hist)
            rows.append({
                "variant": name, "model": cfg.model.name, "params_train": summary["params_train"],
                "params_deploy": summary["params_deploy"],
                "bytes_per_step": summary["bytes_allreduce"] / max(steps, 1),
                "bytes_last_step": hist[-1]["bytes_last_step"], "steps": steps,
                "step_seconds": sum(r["train_seconds"] for r in hist) / max(steps, 1),
                "test_accuracy": summary["test_accuracy"], "wall_seconds": time.perf_counter() - t0,
            })
            print(f"[ray_comm] {name}: {rows[-1]}", flush=True)
    finally:
        ray.shutdown()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table with ratios relative to the dense row of the same model."""
    dense = {VARIANTS[r["variant"]].expand_model: r for r in rows
             if VARIANTS[r["variant"]].compression["kind"] == "none" and VARIANTS[r["variant"]].comm == "none"}
    lines = ["| variant | trainable params | deployed params | bytes/step (mean) | bytes/step (last) "
             "| x dense (last) | s/step | x dense | test acc |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = dense.get(VARIANTS[r["variant"]].expand_model, rows[0])
        lines.append(
            f"| {r['variant']} | {r['params_train']:,} | {r['params_deploy']:,} | {r['bytes_per_step']:,.0f} "
            f"| {r['bytes_last_step']:,} | {r['bytes_last_step'] / max(base['bytes_last_step'], 1):.3f} "
            f"| {r['step_seconds']:.3f} "
            f"| {r['step_seconds'] / max(base['step_seconds'], 1e-9):.2f} | {r['test_accuracy']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--model", default="resnet56")
    p.add_argument("--expand-model", default="smallnet7", help="model of the ExpandNets rows")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--per-class-train", type=int, default=100, help="subset size when writing CIFAR-10")
    p.add_argument("--per-class-test", type=int, default=50)
    p.add_argument("--train-limit", type=int, default=1024)
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=None, help="cap steps per epoch")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (per worker: batch / workers)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_ray_comm")
    args = p.parse_args(argv)
    rows = measure(args.variants, args)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_comm.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / "ray_comm.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
