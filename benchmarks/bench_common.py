"""What the timing benchmarks share: the load gate, thread pinning, one training step (AMP / channels_last
optional), interleaved repeats and their median and spread.

Timing on a shared machine lies in one direction: other jobs slow the compact step more than a fixed per-step
cost, so ratios measured under load look better than the truth. Hence the gate: a run refuses to start above
:data:`MAX_LOAD` (the 1-minute load average, read before this process adds its own threads) unless forced, and
a forced run says so on every table it prints.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOAD = 1.5
GOAL_BATCH = 128  # the issue-17 goals are stated at batch 128; other batch sizes are reported, not judged
FORCED_BANNER = ("!!! FORCED RUN at load {load:.2f} > {limit}: NOT A RECORD, other jobs distort the ratios; "
                 "do not copy !!!")


def add_common_arguments(parser) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    """The flags every timing benchmark takes (threads, repeats, batches, load gate, GPU path)."""
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 32], help="batch sizes, each its own table")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (fixed and printed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median and spread over them)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast bfloat16 (the GPU path; works on CPU too)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    parser.add_argument("--max-load", type=float, default=MAX_LOAD, help="refuse to measure above this load")
    parser.add_argument("--force", action="store_true", help="measure above --max-load anyway (output flagged)")


def load_gate(max_load: float, force: bool) -> str:
    """Print the load average; exit 3 above ``max_load`` unless ``force``. Returns a banner ('' when calm)."""
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (limit {max_load} on the 1-minute figure)")
    if load[0] <= max_load:
        return ""
    if not force:
        print(f"refusing to measure: load average {load[0]:.2f} > {max_load} (other jobs bias the ratios low); "
              f"rerun on a quiet machine or pass --force to get a flagged, unrecordable run", file=sys.stderr)
        raise SystemExit(3)
    banner = FORCED_BANNER.format(load=load[0], limit=max_load)
    print(banner)
    return banner


def record_gate(args) -> str:  # noqa: ANN001 - the namespace of add_common_arguments
    """:func:`load_gate`, and a banner too when fewer than 3 repeats leave no spread worth recording."""
    banner = load_gate(args.max_load, args.force)
    if args.repeats < 3:
        note = f"!!! only {args.repeats} repeat(s): no spread to judge, NOT A RECORD (use --repeats 3 or more) !!!"
        print(note)
        banner = f"{banner}\n{note}" if banner else note
    return banner


def set_threads(threads: int) -> int:
    """Pin torch's intra-op threads; returns the count torch reports."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs: device, batch, autocast (bfloat16) and memory format."""

    device: str = "cpu"
    batch: int = 128
    amp: bool = False
    channels_last: bool = False


class TrainStep:
    """One SGD(momentum 0.9) step of ``net`` on a fixed random CIFAR-shaped batch (values do not change cost).

    ``net`` is moved to the device (and to channels_last) in place. With ``amp`` the forward runs under
    ``torch.autocast(bfloat16)``; re-parameterised layers still compose their weights in float32.
    """

    def __init__(self, net: nn.Module, opts: StepOptions, *, lr: float = 0.01, weight_decay: float = 0.0,
                 seed: int = 0) -> None:
        self.device = torch.device(opts.device)
        fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        self.net = net.to(device=self.device, memory_format=fmt).train()
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(opts.batch, 3, 32, 32, generator=gen).to(self.device, memory_format=fmt)
        self.y = torch.randint(0, 10, (opts.batch,), generator=gen).to(self.device)
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        self.amp = opts.amp

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = F.cross_entropy(self.net(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def state_bytes(self) -> int:
        """Bytes of what training keeps between steps: parameters, their gradients, optimizer state."""
        tensors = {id(p): p for p in self.net.parameters()}
        tensors.update({id(p.grad): p.grad for p in self.net.parameters() if p.grad is not None})
        for state in self.optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
        return sum(t.numel() * t.element_size() for t in tensors.values())


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, steps_per_repeat: int,
                     warmup: int) -> dict[str, list[list[float]]]:
    """Seconds per step: ``[variant][repeat][step]``, variants alternating step by step (A B C A B C ...).

    Interleaving at step granularity makes load drift hit every variant alike.
    """
    if repeats < 1 or steps_per_repeat < 1:
        raise ValueError(f"need at least one repeat and one step, got {repeats} repeats, {steps_per_repeat} steps")
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name in steps:
            times[name].append([])
        for _ in range(steps_per_repeat):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name][-1].append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Ratio:
    """A variant's step time against a baseline: per-repeat medians, then median and range over repeats."""

    step_s: float
    ratio: float
    ratio_min: float
    ratio_max: float

    def text(self) -> str:
        return f"{self.ratio:.3f} [{self.ratio_min:.3f}-{self.ratio_max:.3f}]"


def ratio_to(times: list[list[float]], base: list[list[float]]) -> Ratio:
    """Median over repeats of (median step of the variant / median step of the baseline in the same repeat)."""
    mine = [statistics.median(r) for r in times]
    theirs = [statistics.median(r) for r in base]
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    return Ratio(statistics.median(mine), statistics.median(ratios), min(ratios), max(ratios))
