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
    python benchmarks/federated_pareto.py --data-root data/cifar10 --seeds 0 1 --collect-only   # table only
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


def variant_config(path: Path, args: argparse.Namespace, seed: int) -> RunConfig:
    """One variant's config with the benchmark's data, scale, seed and output (the variant keeps the rest)."""
    sets = [f"data.root={args.data_root}", f"engine.rounds={args.rounds}", f"seed={seed}",
            f"output={args.out / 'runs'}", "device=cpu", "tracking.mlflow.enabled=false",
            f"name={path.stem}-s{seed}"]
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """One row per variant: bytes (identical across seeds), accuracy per seed, mean, and the paired change vs
    dense fp32 (the mean over the seeds both have of variant minus dense)."""
    dense = {seed: r["summary"]["test_accuracy"] for seed, r in results.get(DENSE, {}).items()}
    dense_upload = next((r["summary"]["upload_bytes_per_client_round"] for r in results.get(DENSE, {}).values()),
                        None)
    head = ("| variant | aggregator | upload codec (dtype) | downlink | upload / client / round "
            "| fewer than dense fp32 "
            "| total bytes (up + down) | test accuracy per seed | mean | vs dense (pp) | seconds |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, by_seed in results.items():
        seeds = sorted(by_seed)
        s = by_seed[seeds[0]]["summary"]
        accs = [by_seed[k]["summary"]["test_accuracy"] for k in seeds]
        paired = [by_seed[k]["summary"]["test_accuracy"] - dense[k] for k in seeds if k in dense]
        delta = f"{100 * _mean(paired):+.1f}" if paired else "-"
        per_seed = " / ".join(f"{a:.4f} (s{k})" for a, k in zip(accs, seeds, strict=True))
        screen = by_seed[seeds[0]].get("screen", "")
        upload = s["upload_bytes_per_client_round"]
        ratio = f"{dense_upload / upload:.1f}x" if dense_upload else "-"
        rows.append(f"| {name} | {s.get('strategy', '-')}{screen} | {s.get('transport_codec', 'none')} "
                    f"({s.get('transport_dtype')}) | {s.get('transport_downlink', 'full')} | "
                    f"{human_bytes(upload)} | {ratio} | "
                    f"{human_bytes(s.get('bytes_total'))} | {per_seed} | {_mean(accs):.4f} | {delta} | "
                    f"{_mean([by_seed[k]['seconds'] for k in seeds]):.0f} |")
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="real CIFAR-10 (../shared/data/cifar10.py)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-limit", type=int, default=0, help="smoke runs only (0 = the whole training set)")
    parser.add_argument("--test-limit", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=0, help="smoke runs only: batches per local epoch")
    parser.add_argument("--variants", nargs="*", default=None, help="config stems (default: all)")
    parser.add_argument("--dropout", nargs="+", default=[], metavar="STEM:PARTITION:FIRST-LAST",
                        help="also run variant STEM with one partition offline for rounds FIRST..LAST (repeatable)")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: tabulate the finished runs under --out (missing ones are listed)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pareto")
    args = parser.parse_args(argv)
    dropouts = [parse_dropout(spec) for spec in args.dropout]
    paths = sorted(VARIANT_DIR.glob("*.yaml"))
    if args.variants:
        paths = [p for p in paths if p.stem in set(args.variants)]
    paths.sort(key=lambda p: p.stem != DENSE)  # dense first: the other rows compare with it
    jobs: list[tuple[str, int, RunConfig, Any]] = []
    for seed in args.seeds:
        for path in paths:
            jobs.append((path.stem, seed, variant_config(path, args, seed), client_app))
        for stem, dropping in dropouts:
            name = f"{stem}+dropout{dropping.partition}@{dropping.first}-{dropping.last}"
            cfg = variant_config(VARIANT_DIR / f"{stem}.yaml", args, seed)
            jobs.append((name, seed, cfg.model_copy(update={"name": f"{name}-s{seed}"}), dropping))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for name, seed, cfg, app in jobs:  # one at a time
        if args.collect_only:
            if (done := finished(cfg)) is None:
                print(f"not finished: {name} seed {seed}", flush=True)
                continue
        else:
            print(f"running {name} seed {seed} ...", flush=True)
            done = run_variant(cfg, app)
        screen = cfg.engine.update_screen
        done["screen"] = (f" + {screen.kind} {screen.factor}x median" if screen.kind != "off" else "") + (
            " + direction check" if screen.direction != "off" else "")
        results.setdefault(name, {})[seed] = done
        print(f"  {name} seed {seed}: test accuracy {done['summary']['test_accuracy']:.4f}, upload/client/round "
              f"{done['summary']['upload_bytes_per_client_round']:.0f} B", flush=True)
    seeds = ", ".join(str(k) for k in args.seeds)
    md = table(results)
    (args.out / "pareto.md").write_text(f"# Federated accuracy for bytes ({args.rounds} rounds, seeds {seeds})\n\n"
                                        f"{md}\n\n![accuracy vs bytes](accuracy_vs_bytes.png)\n")
    (args.out / "pareto.json").write_text(json.dumps(results, indent=1, default=str))
    first = args.seeds[0]
    plot_accuracy_vs_bytes([(n, r[first]["history"]) for n, r in results.items() if first in r],
                           args.out / "accuracy_vs_bytes.png")
    print(md)
    print(f"wrote {args.out / 'pareto.md'} and {args.out / 'accuracy_vs_bytes.png'} (curves: seed {first})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
