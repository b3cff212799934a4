"""ExpandNets training cost: step time and memory of compact vs expanded (fused / explicit) nets, as ratios.

One training step = forward + cross-entropy + backward + SGD(momentum) step on a random batch (values do not
change the cost). Per model and batch size, all configurations are built in one process and timed
interleaved step by step (``--repeats`` blocks of ``--steps`` steps); ``time x`` is the median over repeats
of the per-repeat ratio of median step times to the compact net, with its range over repeats in brackets.
The run refuses to start above load average 1.5 (``--force`` runs anyway and flags every table) and pins
``--threads`` (2 by default).

- ``peak MiB`` / ``mem x``: peak training memory of one step after two warm-up steps, in a fresh child
  process per configuration: parameters + gradients + momentum (counted exactly) + the step's peak growth
  above them (activations, autograd and library temporaries: peak resident memory over the step minus the
  resident memory before it, with ``MALLOC_MMAP_THRESHOLD_=65536`` so resident memory follows live tensors);
  CUDA: ``max_memory_allocated`` over the step. One-time library initialisation is left out (see
  :func:`measure_memory`).
- ``saved MiB`` / ``saved x``: bytes autograd keeps for backward in one forward (unique storages, parameters
  excluded), counted with ``saved_tensors_hooks``: the activation memory, deterministic.
- ``compose ms``: forming every fused layer's compact kernel from its factors, forward and backward, alone.

    python benchmarks/expand_speed.py                                   # smallnet7 + resnet20, batch 128 and 32
    python benchmarks/expand_speed.py --models smallnet7 --configs compact ck-fused ck-explicit --batch 128
    python benchmarks/expand_speed.py --device cuda --amp --channels-last --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from benchmarks.bench_common import (  # noqa: E402
    GOAL_BATCH,
    StepOptions,
    TrainStep,
    add_common_arguments,
    ratio_to,
    record_gate,
    set_threads,
    time_interleaved,
)
from models.expand_layers import ExpandedLinear  # noqa: E402
from models.expandnets import expand, expanded_layers  # noqa: E402

CONFIGS = ("compact", "cl-fused", "ck-fused", "ck+fc-fused", "cl+fc-fused")
ALL_CONFIGS = ("compact",) + tuple(f"{s}-{m}" for s in ("cl", "ck", "fc", "cl+fc", "ck+fc")
                                   for m in ("explicit", "fused"))
GOALS = {"cl-fused": 1.10, "ck-fused": 1.10, "cl+fc-fused": 1.15, "ck+fc-fused": 1.15, "fc-fused": 1.15}
MEMORY_GOAL = 1.10


def build(model_name: str, config: str) -> torch.nn.Module:
    """The compact net or its r=4 expansion (ValueError when the strategy does not apply to the model)."""
    torch.manual_seed(0)
    net = models.build(model_name)
    if config == "compact":
        return net
    strategy, mode = config.rsplit("-", 1)
    net = expand(net, strategy, rate=4, mode=mode)
    if strategy.endswith("fc") and not any(isinstance(m, ExpandedLinear) for _, m in expanded_layers(net)):
        raise ValueError(f"strategy {strategy!r} expands no Linear layer of {model_name} (only its classifier)")
    return net


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def saved_activation_bytes(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (unique storages, parameters excluded): deterministic."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), y)
    del loss
    return sum(seen.values())


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM of /proc/self/status), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(model_name: str, config: str, opts: StepOptions) -> dict:
    """Peak training memory of one step after two warm-up steps, and the saved activation bytes.

    Training memory = what persists between steps (parameters, gradients, momentum: counted exactly) + the
    step's peak growth above that (activations, autograd and library temporaries). The warm-up steps
    initialise the libraries (oneDNN kernels and scratch, thread pools: a fixed cost of any process, tens of
    MiB, that would dilute the ratios) and create the momentum buffers. CPU: the growth is the peak resident
    memory over the step (VmHWM, reset before it) minus the resident memory before it; the child runs with
    ``MALLOC_MMAP_THRESHOLD_=65536`` so freed large blocks leave the process at once and resident memory
    follows live tensors. CUDA: ``max_memory_allocated`` over the step, which already counts the persistent
    tensors.
    """
    net = build(model_name, config)
    step = TrainStep(net, opts)
    step()
    step()
    if opts.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        state = step.state_bytes()
        base = _rss_bytes()
        _reset_peak_rss()
        step()
        peak = state + max(0, _peak_rss_bytes() - base)
    dev = torch.device(opts.device)
    x = torch.randn(opts.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (opts.batch,), device=dev)
    return {"params": sum(p.numel() for p in net.parameters()), "peak_bytes": peak,
            "saved_bytes": saved_activation_bytes(net, x, y)}


def _memory_child(model_name: str, config: str, args: argparse.Namespace, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", model_name, config, "--batch", str(batch),
           "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--amp"] * args.amp + ["--channels-last"] * args.channels_last
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed large blocks go back to the OS at once
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def composition_seconds(net: torch.nn.Module, reps: int = 5) -> float:
    """Median seconds to compose every fused layer's (W, b) from its factors and back-propagate into them."""
    layers = [m for _, m in expanded_layers(net) if m.mode == "fused"]
    if not layers:
        return 0.0

    def once() -> None:
        total = sum(w.sum() + (0 if b is None else b.sum()) for w, b in (m.composed() for m in layers))
        total.backward()
        net.zero_grad(set_to_none=True)

    once()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def run_table(model_name: str, configs: list[str], args: argparse.Namespace, batch: int) -> list[dict]:
    """Memory (children) and interleaved timing (this process) of every applicable config at one batch size."""
    opts = StepOptions(args.device, batch, args.amp, args.channels_last)
    rows, nets = [], {}
    for config in configs:
        try:
            nets[config] = build(model_name, config)
        except ValueError as exc:
            rows.append({"model": model_name, "config": config, "batch": batch, "skipped": str(exc)})
    compose = {c: composition_seconds(n) for c, n in nets.items()}
    steps = {c: TrainStep(n, opts) for c, n in nets.items()}
    times = time_interleaved(steps, args.repeats, args.steps, args.warmup)
    mem = {c: _memory_child(model_name, c, args, batch) for c in nets}
    base = "compact" if "compact" in nets else next(iter(nets))
    for config in nets:
        r = ratio_to(times[config], times[base])
        m = mem[config]
        rows.append({"model": model_name, "config": config, "batch": batch, **m, "step_s": r.step_s,
                     "time_x": r.ratio, "time_x_min": r.ratio_min, "time_x_max": r.ratio_max,
                     "mem_x": m["peak_bytes"] / mem[base]["peak_bytes"] if mem[base]["peak_bytes"] > 0 else None,
                     "saved_x": m["saved_bytes"] / mem[base]["saved_bytes"], "compose_s": compose[config],
                     "repeat_medians_s": [statistics.median(rep) for rep in times[config]]})
    return rows


def _verdict(row: dict) -> str:
    goal = GOALS.get(row["config"])
    if goal is None or row["batch"] != GOAL_BATCH:
        return ""
    t = "met" if row["time_x"] <= goal else "MISSED"
    mx = row.get("mem_x")
    m = "" if mx is None else (" mem met" if mx <= MEMORY_GOAL else " mem MISSED")
    return f"time {t} (<= {goal}){m}"


def print_table(rows: list[dict], banner: str) -> None:
    header = (f"{'model':<11} {'batch':>5} {'config':<14} {'params':>9} {'step ms':>8} {'time x [range]':>21} "
              f"{'compose ms':>10} {'peak MiB':>8} {'mem x':>6} {'saved x':>7}  goal (batch {GOAL_BATCH})")
    if banner:
        print(banner)
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:<11} {r['batch']:>5} {r['config']:<14} n/a: {r['skipped'][:70]}")
            continue
        mx = "n/a" if r["mem_x"] is None else f"{r['mem_x']:.2f}"
        print(f"{r['model']:<11} {r['batch']:>5} {r['config']:<14} {r['params']:>9,} {r['step_s'] * 1e3:>8.1f} "
              f"{r['time_x']:>7.3f} [{r['time_x_min']:.3f}-{r['time_x_max']:.3f}] {r['compose_s'] * 1e3:>10.2f} "
              f"{r['peak_bytes'] / 2**20:>8.1f} {mx:>6} {r['saved_x']:>7.2f}  {_verdict(r)}")
    if banner:
        print(banner)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smallnet7", "resnet20"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=ALL_CONFIGS)
    add_common_arguments(p)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    if args.memory_child:
        opts = StepOptions(args.device, args.batch[0], args.amp, args.channels_last)
        print(json.dumps(measure_memory(*args.memory_child, opts)))
        return []
    banner = record_gate(args)
    print(f"device={args.device} threads={threads} amp={args.amp} channels_last={args.channels_last} "
          f"repeats={args.repeats} steps={args.steps} warmup={args.warmup} torch={torch.__version__}")
    rows = [row for batch in args.batch for model_name in args.models
            for row in run_table(model_name, args.configs, args, batch)]
    print_table(rows, banner)
    print(f"load average after the run {os.getloadavg()[0]:.2f} (includes this run's own {threads} threads)")
    if args.json:
        args.json.write_text(json.dumps({"forced": bool(banner), "threads": threads, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
