"""Accuracy for bytes on real CIFAR-10: the Flower codec variants of ``configs/federated/pareto/``, one at a time.

Every variant is its config file (SmallNet-7, 10 clients, Dirichlet(0.5), one local epoch per round, FedAvg)
with this script's overrides for data, rounds and output; the real ServerApp body and ClientApp run through
the in-process ``LocalGrid`` (Flower messages without Ray). Bytes are those the strategy measured on what
travels (ArrayRecord payloads; ``message_bytes_*`` for whole serialised messages). Writes ``pareto.md`` (a
table: upload per client per round, compression vs dense fp32, total bytes, final accuracy of the deployed
compact model and its change vs dense) and ``accuracy_vs_bytes.png`` into ``--out``.

    python ../shared/data/cifar10.py data/cifar10
    python benchmarks/federated_pareto.py --data-root data/cifar10 --rounds 25          # the full table
    python benchmarks/federated_pareto.py --data-root data/cifar10 --rounds 2 --train-limit 2000  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clients.app import app as client_app  # noqa: E402
from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.report import human_bytes, plot_accuracy_vs_bytes  # noqa: E402
from server.local_grid import LocalGrid  # noqa: E402
from server.runner import run_server  # noqa: E402

VARIANT_DIR = REPO / "configs" / "federated" / "pareto"
DENSE = "smallnet7_dense"


def variant_config(path: Path, args: argparse.Namespace) -> RunConfig:
    """One variant's config with the benchmark's data, scale, seed and output (the variant keeps the rest)."""
    sets = [f"data.root={args.data_root}", f"engine.rounds={args.rounds}", f"seed={args.seed}",
            f"output={args.out / 'runs'}", "device=cpu", "tracking.mlflow.enabled=false",
            f"name={path.stem}-s{args.seed}"]
    if args.train_limit:
        sets.append(f"data.train_limit={args.train_limit}")
    if args.test_limit:
        sets.append(f"data.test_limit={args.test_limit}")
    if args.max_batches:
        sets.append(f"train.max_batches={args.max_batches}")
    return load_config(path, sets)


def finished(cfg: RunConfig) -> dict[str, Any] | None:
    """A variant this output folder already holds at the asked number of rounds (reused, not re-run)."""
    metrics = cfg.run_dir / "metrics.json"
    if not metrics.exists():
        return None
    done = json.loads(metrics.read_text())
    if done["summary"].get("rounds") != cfg.engine.rounds:
        return None
    return {"summary": done["summary"], "history": done["history"], "seconds": done["summary"]["wall_seconds"]}


class DroppingClient:
    """The real ClientApp, except that one partition does not answer train messages for some rounds.

    Benchmark-only (not a config key): the node's reply is an error, which the server treats as a missing
    reply; when it comes back its downlink base and error-feedback residual are stale, as a real node's are.
    """

    def __init__(self, partition: int, first: int, last: int) -> None:
        self.partition, self.first, self.last = partition, first, last

    def __call__(self, message: Any, context: Any) -> Any:
        server_round = int(message.content["config"]["server-round"]) if "config" in message.content else 0
        if (message.metadata.message_type == "train" and context.node_config["partition-id"] == self.partition
                and self.first <= server_round <= self.last):
            raise ConnectionError(f"partition {self.partition} is offline in round {server_round}")
        return client_app(message, context)


def parse_dropout(spec: str) -> tuple[str, DroppingClient]:
    """``STEM:PARTITION:FIRST-LAST`` (e.g. ``smallnet7_topk1_q8_ef:3:6-10``) -> (variant stem, client)."""
    try:
        stem, part, rounds = spec.split(":")
        first, last = (int(x) for x in rounds.split("-"))
        return stem, DroppingClient(int(part), first, last)
    except ValueError:
        raise SystemExit(f"--dropout {spec!r}: expected STEM:PARTITION:FIRST-LAST, "
                         "e.g. smallnet7_dense:3:6-10") from None


def run_variant(cfg: RunConfig, app: Any = client_app) -> dict[str, Any]:
    """Train one variant to the end (continuing an interrupted run from its checkpoint); returns its results."""
    if (done := finished(cfg)) is not None:
        return done
    if (cfg.run_dir / "checkpoints").exists():
        cfg = cfg.model_copy(update={"resume": True})
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = run_server(LocalGrid(app, cfg.engine.clients), cfg, cfg.run_dir)
    history = json.loads((cfg.run_dir / "metrics.json").read_text())["history"]
    return {"summary": summary, "history": history, "seconds": time.perf_counter() - started}


def table(results: dict[str, dict[str, Any]]) -> str:
    dense_acc = results.get(DENSE, {}).get("summary", {}).get("test_accuracy")
    head = ("| variant | upload codec (dtype) | downlink | upload / client / round | vs dense fp32 "
            "| total bytes (up + down) | test accuracy "
            "| vs dense (pp) | seconds |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, r in results.items():
        s = r["summary"]
        acc = s["test_accuracy"]
        delta = f"{100 * (acc - dense_acc):+.1f}" if dense_acc is not None else "-"
        rows.append(f"| {name} | {s.get('transport_codec', 'none')} ({s.get('transport_dtype')}) | "
                    f"{s.get('transport_downlink', 'full')} | "
                    f"{human_bytes(s['upload_bytes_per_client_round'])} | {s.get('upload_compression')}x | "
                    f"{human_bytes(s.get('bytes_total'))} | {acc:.4f} | {delta} | {r['seconds']:.0f} |")
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="real CIFAR-10 (../shared/data/cifar10.py)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0, help="smoke runs only (0 = the whole training set)")
    parser.add_argument("--test-limit", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=0, help="smoke runs only: batches per local epoch")
    parser.add_argument("--variants", nargs="*", default=None, help="config stems (default: all)")
    parser.add_argument("--dropout", default=None, metavar="STEM:PARTITION:FIRST-LAST",
                        help="also run variant STEM with one partition offline for rounds FIRST..LAST")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pareto")
    args = parser.parse_args(argv)
    dropout = parse_dropout(args.dropout) if args.dropout else None
    paths = sorted(VARIANT_DIR.glob("*.yaml"))
    if args.variants:
        paths = [p for p in paths if p.stem in set(args.variants)]
    paths.sort(key=lambda p: p.stem != DENSE)  # dense first: the other rows compare with it
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for path in paths:  # one at a time
        print(f"running {path.stem} ...", flush=True)
        results[path.stem] = run_variant(variant_config(path, args))
        print(f"  test accuracy {results[path.stem]['summary']['test_accuracy']:.4f}, upload/client/round "
              f"{results[path.stem]['summary']['upload_bytes_per_client_round']:.0f} B", flush=True)
    if dropout is not None:
        stem, dropping = dropout
        name = f"{stem}+dropout{dropping.partition}@{dropping.first}-{dropping.last}"
        cfg = variant_config(VARIANT_DIR / f"{stem}.yaml", args)
        cfg = cfg.model_copy(update={"name": f"{name}-s{args.seed}"})
        print(f"running {name} ...", flush=True)
        results[name] = run_variant(cfg, dropping)
    md = table(results)
    (args.out / "pareto.md").write_text(f"# Federated accuracy for bytes ({args.rounds} rounds, seed {args.seed})\n\n"
                                        f"{md}\n\n![accuracy vs bytes](accuracy_vs_bytes.png)\n")
    (args.out / "pareto.json").write_text(json.dumps(results, indent=1, default=str))
    plot_accuracy_vs_bytes([(n, r["history"]) for n, r in results.items()], args.out / "accuracy_vs_bytes.png")
    print(md)
    print(f"wrote {args.out / 'pareto.md'} and {args.out / 'accuracy_vs_bytes.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
