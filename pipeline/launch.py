"""The script users submit to a Ray cluster: ``python pipeline/launch.py CONFIG [--set key=value ...]``.

    ray up ray_cluster.yaml
    ray submit ray_cluster.yaml pipeline/launch.py configs/ray/smallnet7_ck.yaml --set train.epochs=2
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipeline/launch.py CONFIG

It runs as a plain script (no installed package needed): when ``pipeline`` does not import, the project
root is found beside this file, in ``$COMPACTFL_HOME`` or in ``~/compactfl`` (where ``ray_cluster.yaml``
ships it; ``ray submit`` copies this script alone to the head's home). A relative CONFIG that does not
exist from the current directory is looked up in the project root. The run then goes through the same
dispatch as ``compactfl run`` (engine from the config: ``ray`` joins the cluster this node belongs to).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, Python puts pipeline/ itself first on sys.path, where config.py, data.py, train.py... would
# shadow top-level modules (and Ray would copy that entry to its workers): drop it.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _HERE]


def project_roots() -> list[Path]:
    """Candidate project roots, in order: beside this file, ``$COMPACTFL_HOME``, ``~/compactfl``, cwd."""
    roots = [Path(__file__).resolve().parent.parent]
    if os.environ.get("COMPACTFL_HOME"):
        roots.append(Path(os.environ["COMPACTFL_HOME"]).expanduser())
    roots += [Path("~/compactfl").expanduser(), Path.cwd()]
    return roots


def ensure_importable() -> Path | None:
    """Make ``import pipeline`` work; returns the project root put on sys.path (None when already importable)."""
    for root in project_roots():
        if (root / "pipeline" / "__init__.py").is_file() and (root / "models" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return root
    try:
        import pipeline  # noqa: F401  (installed package)
    except ImportError:
        raise SystemExit("launch.py: cannot find the compactfl project (pipeline/, models/); install it or "
                         "set COMPACTFL_HOME to its folder") from None
    return None


def resolve_config(path: str, root: Path | None) -> str:
    """CONFIG as given when it exists, else relative to the project root (``ray submit`` runs in ~)."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute() or root is None:
        return str(p)
    candidate = root / p
    return str(candidate) if candidate.is_file() else str(p)


def main(argv: list[str] | None = None) -> int:
    """Parse ``CONFIG [--set k=v ...] [--quiet]`` and run it through ``compactfl run``; returns the exit code."""
    import argparse

    parser = argparse.ArgumentParser(prog="launch.py", description="Run a compactfl config (Ray cluster entry).")
    parser.add_argument("config", help="YAML run config, e.g. configs/ray/smallnet7_ck.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and results on the console")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    root = ensure_importable()
    from pipeline.cli import main as cli_main

    cli_args = (["--quiet"] if args.quiet else []) + ["run", resolve_config(args.config, root)]
    for item in args.set:
        cli_args += ["--set", item]
    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
