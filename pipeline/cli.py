"""The ``compactfl`` command line: run, inspect, export, report, partition, nightly.

Exit codes: 0 success, 1 a failed run or a nightly regression, 2 a usage error reported as one line on
stderr: a bad config, override or argument, a missing data root, an unknown model, a compression that does not
fit the model, a resume whose config differs from its checkpoint, missing optional extras (ONNX), and a
federated round that got too few valid replies (``TooFewReplies``/``RoundFailed``: fix the clients or the
settings, then rerun with ``resume: true``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DATA_HINT = ("write CIFAR-10 there with: python ../shared/data/cifar10.py DIR "
             "(or set data.root: null for the embedded subset)")


class UsageError(ValueError):
    """A problem with what the user asked for (exit code 2)."""


# ------------------------------------------------------------------------------------------ preflight
def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any training, on a missing data root, an unknown model or an unfit compression."""
    from pipeline.modeling import build_compact_model, build_training_model

    root = cfg.data.root
    if root is not None:
        if not Path(root).is_dir():
            raise UsageError(f"data.root: folder {str(root)!r} does not exist; {DATA_HINT}")
        from pipeline.data import DataError, load_split

        try:
            load_split(cfg.data, "test")  # validates the folder layout and files (cached for the run)
        except DataError as exc:
            raise UsageError(f"data.root: {_one_line(exc)}") from None
    try:
        build_compact_model(cfg)
        if cfg.teacher is not None and cfg.teacher.model is not None:
            import models

            models.build(cfg.teacher.model.name, num_classes=cfg.data.num_classes, **cfg.teacher.model.kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model: {_one_line(exc)}") from None
    if cfg.compression.kind != "none":
        try:
            build_training_model(cfg)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"compression: {_one_line(exc)}") from None
    if cfg.teacher is not None and cfg.teacher.checkpoint is not None and not Path(cfg.teacher.checkpoint).exists():
        raise UsageError(f"teacher.checkpoint: {str(cfg.teacher.checkpoint)!r} does not exist "
                         "(train the teacher first, e.g. compactfl run configs/wrn40_2_teacher.yaml)")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------------------------- run
def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table: train-time vs deploy-time params and MACs, accuracy, bytes, time."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.report import summary_rows

    console = Console(width=max(100, Console().width))
    console.print(f"[bold]compactfl run {summary.get('name')}[/]: {summary.get('engine')} engine, "
                  f"{summary.get('model')}, compression {summary.get('compression')}, "
                  f"distillation {summary.get('distill')}")
    table = Table()
    table.add_column("quantity")
    table.add_column("train-time", justify="right")
    table.add_column("deploy-time", justify="right")
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
    if summary.get("bytes_per_round"):
        console.print("bytes per round (up + down): " + ", ".join(f"{b:,}" for b in summary["bytes_per_round"]))


def cmd_run(args: argparse.Namespace) -> int:
    """``compactfl run [CONFIG] [--set k=v ...]``: prepare the run dir, train on the engine, finish."""
    from pipeline.engines import run_engine
    from pipeline.stages import prepare_run_dir

    cfg = load_config(args.config, args.set)
    preflight(cfg)
    run_dir = prepare_run_dir(cfg)
    try:
        summary = run_engine(cfg, run_dir)
    except RuntimeError as exc:
        if cfg.engine.kind == "flower":
            from server.loop import RoundFailed
            from server.strategies import TooFewReplies

            if isinstance(exc, TooFewReplies | RoundFailed):
                raise UsageError(_one_line(exc)) from None
        raise
    print_summary(summary)
    print(f"run dir: {run_dir}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- inspect
def parse_slice(text: str) -> tuple[int, int, int, int]:
    """``16,16,3,3`` or ``16x16x3x3`` -> (16, 16, 3, 3)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--csg: slice shape {text!r} must be four integers like 16,16,3,3") from None
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"--csg: slice shape {text!r} must be four positive integers like 16,16,3,3")
    return shape  # type: ignore[return-value]


def inspect_rows(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(label, model) pairs to count for ``inspect``: compact, train-time and deploy-time variants."""
    import models

    try:
        net = models.build(args.model, num_classes=args.num_classes)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model: {_one_line(exc)}") from None
    rows: list[tuple[str, Any]] = [(f"{args.model} (compact)", net)]
    flag = "--expand/--rate" if args.expand else "--csg/--code-size" if args.csg else "--block"
    try:
        if args.expand:
            exp = models.expand(net, args.expand, rate=args.rate, mode="explicit")
            rows += [(f"expanded {args.expand} r={args.rate:g} (train-time)", exp),
                     ("contracted (deploy-time)", models.contract(exp))]
        elif args.csg:
            csg = models.csg_compress(net, slice_shape=parse_slice(args.csg), code_size=args.code_size,
                                      binary=args.binary)
            rows += [(f"csg {args.csg} n={args.code_size} (train-time)", csg),
                     ("materialized (deploy-time)", models.materialize(csg))]
        elif args.block:
            rows += [(f"cheap {args.block} (train = deploy)", models.cheapen(net, block=args.block))]
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{flag}: {_one_line(exc)}") from None
    return rows


def count_row(label: str, model: Any, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(params, params + BN stats, MACs, fp32 payload bytes) of one inspected model at input ``shape``."""
    import models

    try:
        macs = models.count_macs(model, shape)
    except RuntimeError as exc:  # a forward pass that does not fit the input size
        raise UsageError(f"--image-size {shape[-1]}: {label} cannot run on {shape[-1]}x{shape[-1]} inputs "
                         f"({_one_line(exc)})") from None
    return (models.count_params(model), models.count_params(model, include_buffers=True), macs,
            models.payload_bytes(model))


def cmd_inspect(args: argparse.Namespace) -> int:
    """``compactfl inspect MODEL [...]``: parameters and MACs of the compact/train-time/deploy-time nets."""
    from rich.console import Console
    from rich.table import Table

    if args.expand and args.rate is None:
        raise UsageError("--expand needs --rate R (e.g. --rate 4)")
    if args.csg and args.code_size is None:
        raise UsageError("--csg needs --code-size N (e.g. --code-size 128)")
    shape = (1, 3, args.image_size, args.image_size)
    table = Table(title=f"compactfl inspect {args.model} ({args.num_classes} classes, input {shape})")
    for col in ("model", "params", "params + BN stats", "MACs", "payload (fp32)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, m in inspect_rows(args):
        params, with_buffers, macs, payload = count_row(label, m, shape)
        table.add_row(label, f"{params:,}", f"{with_buffers:,}", f"{macs:,}", f"{payload:,} B")
    Console(width=max(110, Console().width)).print(table)
    return EXIT_OK


# -------------------------------------------------------------------------------------- export/report
def cmd_export(args: argparse.Namespace) -> int:
    """``compactfl export RUN_DIR --onnx``: ONNX of the compact model, checked with onnxruntime."""
    from pipeline.export import export_onnx, missing_onnx_packages

    if not args.onnx:
        raise UsageError("export: choose a format (--onnx)")
    missing = missing_onnx_packages()
    if missing:
        raise UsageError(f"export --onnx needs the ONNX extras (missing {', '.join(missing)}): "
                         "pip install 'compactfl[onnx]'")
    if not (Path(args.run_dir) / "model.json").is_file():
        raise UsageError(f"export: {args.run_dir!r} is not a finished run dir (no model.json)")
    result = export_onnx(Path(args.run_dir), Path(args.out) if args.out else None, opset=args.opset)
    print(f"wrote {result['path']} ({result['bytes']:,} bytes)")
    if result.get("max_abs_diff") is not None:
        print(f"onnxruntime check: max |onnx - torch| / logit scale = {result['max_abs_diff']:.3g} "
              f"on {result['samples']} inputs")
    else:
        print("onnxruntime not installed: output not checked")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """``compactfl report RUN_DIR...``: one comparison table (console + markdown) and one plot."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.report import COLUMN_TITLES, COMPARE_COLUMNS, _fmt_cell, compare_runs

    run_dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (run_dirs[0].parent if len(run_dirs) > 1 else run_dirs[0])
    try:
        rows, md, png = compare_runs(run_dirs, out)
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from None
    table = Table(title="compactfl runs")
    for c in COMPARE_COLUMNS:
        table.add_column(COLUMN_TITLES.get(c, c), no_wrap=c == "name",
                         justify="left" if c in ("name", "engine", "model", "compression", "distill") else "right")
    for r in rows:
        table.add_row(*[_fmt_cell(c, r[c]) for c in COMPARE_COLUMNS])
    Console(width=max(180, Console().width)).print(table)
    print(f"wrote {md} and {png}")
    return EXIT_OK


def cmd_nightly(args: argparse.Namespace) -> int:
    """``compactfl nightly``: run the seeded suite and check it (exit 1 on a regression or failure);
    ``--calibrate N`` records the baseline from N seeds per run instead."""
    from pipeline.nightly import NightlyFailure, run_nightly

    try:
        ok = run_nightly(suite=Path(args.suite), baseline=Path(args.baseline), output=Path(args.output),
                         overrides=args.set, only=args.only, calibrate=args.calibrate)
    except NightlyFailure as exc:
        print(f"nightly: FAIL: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_FAILED


def cmd_partition(args: argparse.Namespace) -> int:
    """``compactfl partition CONFIG --out DIR``: each SuperNode's own data folder (DIR/node-0, ...)."""
    from pipeline.data import DataError
    from pipeline.data.node_data import write_node_partitions

    try:
        folders = write_node_partitions(load_config(args.config, args.set), Path(args.out))
    except DataError as exc:
        raise UsageError(_one_line(exc)) from None
    print(f"wrote {len(folders)} node folders under {args.out} (start node i with --node-config "
          f"'partition-id=i num-partitions={len(folders)} data-dir=\"{Path(args.out).resolve()}/node-i\"')")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- parser
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one stderr line and exit code 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"compactfl: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of all subcommands."""
    p = OneLineParser(prog="compactfl", description="Train compact CNNs locally, on Ray, or with Flower.")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and results on the console")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a config (default: the embedded demo)")
    r.add_argument("config", nargs="?", default=None, help="YAML run config (default: configs/demo.yaml)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.1")
    r.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="params and MACs of a model and its compressed variants")
    i.add_argument("model", help="registered model name, e.g. smallnet7, resnet56, wrn-40-2")
    i.add_argument("--num-classes", type=positive_int, default=10)
    i.add_argument("--image-size", type=positive_int, default=32)
    g = i.add_mutually_exclusive_group()
    g.add_argument("--expand", choices=["cl", "ck", "fc", "cl+fc", "ck+fc"], help="ExpandNets strategy")
    g.add_argument("--csg", metavar="SLICE", help="CSG slice shape, e.g. 16,16,3,3")
    g.add_argument("--block", metavar="SPEC", help="Moonshine cheap block, e.g. G(4) or B(2)")
    i.add_argument("--rate", type=float, help="expansion rate for --expand")
    i.add_argument("--code-size", type=positive_int, help="CSG code size for --csg")
    i.add_argument("--binary", action="store_true", help="binary (BCSG) generator for --csg")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="export a run's compact model")
    e.add_argument("run_dir")
    e.add_argument("--onnx", action="store_true", help="write ONNX and check it with onnxruntime")
    e.add_argument("--out", help="output file (default: RUN_DIR/model.onnx)")
    e.add_argument("--opset", type=int, default=18)
    e.set_defaults(func=cmd_export)

    rp = sub.add_parser("report", help="compare finished runs in one table and one plot")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", help="folder for comparison.md/png (default: parent of the run dirs)")
    rp.set_defaults(func=cmd_report)

    pt = sub.add_parser("partition", help="write each Flower node's partition to its own folder (deployment)")
    pt.add_argument("config", help="YAML run config (data, data.partition, engine.clients, seed)")
    pt.add_argument("--out", required=True, help="folder for node-0, node-1, ...")
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. engine.clients=3")
    pt.set_defaults(func=cmd_partition)

    n = sub.add_parser("nightly", help="seeded regression suite compared with a baseline")
    n.add_argument("--suite", default="configs/nightly", help="suite folder: configs + suite.yaml")
    n.add_argument("--baseline", default="regression/baseline.json")
    n.add_argument("--output", default="runs/nightly", help="folder for the suite's run dirs and reports")
    n.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="record the baseline: run each suite entry with N seeds (mean and spread per metric)")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every suite run")
    n.add_argument("--only", action="append", default=None, metavar="NAME", help="run only these suite entries")
    n.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    n.set_defaults(func=cmd_nightly)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compactfl`` console script; returns the exit code."""
    from pipeline.logging_utils import detach_run_log, setup_console

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argument error (2)
        return int(exc.code or 0)
    setup_console(quiet=args.quiet)
    try:
        return int(args.func(args))
    except (ConfigError, UsageError) as exc:
        print(f"compactfl: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"compactfl: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"compactfl: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("compactfl: interrupted", file=sys.stderr)
        return 130
    finally:
        detach_run_log()


if __name__ == "__main__":
    sys.exit(main())
