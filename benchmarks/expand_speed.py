"""ExpandNets training cost: step time and memory of compact vs expanded (explicit / fused) nets, as ratios.

One training step = forward + cross-entropy + backward + SGD(momentum) step on a random batch (values do not
change the cost). Every measurement runs in its own fresh subprocess (memory and timing separately). Columns:

- ``step ms`` / ``time x``: median wall time of the timed steps, and its ratio to the compact net.
- ``cpu x``: the same ratio for process CPU time (less sensitive to other jobs on a shared CPU).
- ``peak MiB`` / ``mem x``: what training adds on top of the built model: CPU: peak resident memory
  (``ru_maxrss``) over two steps minus the resident memory just before them (activations, gradients,
  momentum, autograd and library temporaries as the OS sees them; the memory child runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed large blocks leave the process at once, which would distort
  timing, hence the separate child); CUDA: ``max_memory_allocated`` minus the bytes allocated before.
- ``saved MiB`` / ``saved x``: bytes autograd keeps for backward in one forward (unique storages,
  parameters excluded), counted with ``saved_tensors_hooks``: the activation memory, deterministic.

With ``--rounds`` > 1 the timing runs round-robin and the best value per configuration is kept (noise on a
shared CPU only adds). ``--budget`` caps the timed seconds per configuration so the default
run stays short (the explicit MobileNetV2 chain takes minutes per step on 2 cores).

    python benchmarks/expand_speed.py                      # smallnet7 + mobilenetv2, batch 128, CPU
    python benchmarks/expand_speed.py --threads 1 --rounds 3 --configs compact cl-fused ck-fused ck+fc-fused
    python benchmarks/expand_speed.py --device cuda --steps 50 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("compact", "cl-explicit", "cl-fused", "ck-explicit", "ck-fused")
ALL_CONFIGS = ("compact",) + tuple(f"{s}-{m}" for s in ("cl", "ck", "fc", "cl+fc", "ck+fc")
                                   for m in ("explicit", "fused"))


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def saved_activation_bytes(net, x, y) -> int:
    """Bytes autograd keeps for backward in one forward (unique storages, parameters excluded): deterministic."""
    import torch
    import torch.nn.functional as F

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


def measure(model_name: str, config: str, what: str, args: argparse.Namespace) -> dict:
    """One configuration in this process: ``what="time"`` (seconds/step) or ``"memory"`` (peak and saved bytes).

    Timing stops early once ``args.budget`` seconds have been spent on timed steps (at least one is timed).
    Memory runs two steps (the second one holds momentum buffers) and then counts the saved activations.
    """
    import torch
    import torch.nn.functional as F

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    import models
    from models.expandnets import expand

    torch.manual_seed(0)
    net = models.build(model_name)
    if config != "compact":
        strategy, mode = config.rsplit("-", 1)
        try:
            net = expand(net, strategy, rate=4, mode=mode)
        except ValueError as exc:
            return {"skipped": str(exc)}
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    net = net.to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    info = {"params": sum(p.numel() for p in net.parameters()), "threads": torch.get_num_threads()}
    if what == "memory":
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_bytes()
        step()
        step()
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        return {**info, "peak_bytes": peak, "saved_bytes": saved_activation_bytes(net, x, y)}
    times: list[float] = []
    cpu_times: list[float] = []
    for i in range(args.warmup + args.steps):
        if times and sum(times) >= args.budget:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return {**info, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
            "timed_steps": len(times)}


def _run_child(model_name: str, config: str, what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name, config, what, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--threads", str(args.threads), "--budget", str(args.budget)]
    env = dict(os.environ)
    if what == "memory":  # large blocks straight from/to the OS: resident memory follows live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # (not for timing: fresh pages cost page faults every step)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smallnet7", "mobilenetv2"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=ALL_CONFIGS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds of timed steps per configuration before it stops early (at least one step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "CONFIG", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return

    runs: dict[tuple[str, str], list[dict]] = {}
    results: dict[tuple[str, str], dict] = {}
    for model_name in args.models:  # memory once (it does not drift), then timing round-robin
        for config in args.configs:
            results[(model_name, config)] = _run_child(model_name, config, "memory", args)
    for _ in range(args.rounds):
        for model_name in args.models:
            for config in args.configs:
                if "skipped" not in results[(model_name, config)]:
                    runs.setdefault((model_name, config), []).append(_run_child(model_name, config, "time", args))
    for key, rs in runs.items():  # best of the rounds (noise on a shared CPU only adds)
        results[key].update(step_s=min(r["step_s"] for r in rs), cpu_s=min(r["cpu_s"] for r in rs),
                            timed_steps=sum(r["timed_steps"] for r in rs), threads=rs[0]["threads"])

    print(f"device={args.device} batch={args.batch} steps={args.steps} warmup={args.warmup} rounds={args.rounds}"
          f" threads={next(iter(results.values())).get('threads', '?')}")
    header = (f"{'model':<12} {'config':<14} {'params':>10} {'step ms':>9} {'time x':>7} {'cpu x':>6} "
              f"{'peak MiB':>9} {'mem x':>6} {'saved MiB':>9} {'saved x':>7}")
    print(header)
    print("-" * len(header))
    for model_name in args.models:
        base = results.get((model_name, "compact"))
        for config in args.configs:
            r = results[(model_name, config)]
            if "skipped" in r:
                print(f"{model_name:<12} {config:<14} {'n/a: ' + r['skipped'][:70]}")
                continue
            tx = r["step_s"] / base["step_s"] if base else float("nan")
            cx = r["cpu_s"] / base["cpu_s"] if base else float("nan")
            mx = r["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] > 0 else float("nan")
            sx = r["saved_bytes"] / base["saved_bytes"] if base else float("nan")
            print(f"{model_name:<12} {config:<14} {r['params']:>10,} {r['step_s'] * 1e3:>9.1f} {tx:>7.2f} {cx:>6.2f} "
                  f"{r['peak_bytes'] / 2**20:>9.1f} {mx:>6.2f} {r['saved_bytes'] / 2**20:>9.1f} {sx:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({f"{m}/{c}": r for (m, c), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
