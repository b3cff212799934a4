"""The round loop: Flower's ``Strategy.start`` sequence, but able to start at round k+1 (resume).

``Strategy.start`` always counts rounds from 1, and FedAdam's bias correction depends on the round number,
so a resumed run must continue the numbering. This loop calls the same strategy methods in the same order
(configure_train -> send_and_receive -> aggregate_train -> configure_evaluate -> send_and_receive ->
aggregate_evaluate) and hands each finished round to ``on_round`` (centralised evaluation + checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("compactfl.server")
OnRound = Callable[[int, ArrayRecord, MetricRecord | None, MetricRecord | None, float], None]


class RoundFailed(RuntimeError):
    """A round produced no aggregate (e.g. Ray never started and no replies arrived)."""


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, *, first_round: int, last_round: int,
               timeout: float, config: Callable[[int], ConfigRecord], on_round: OnRound) -> ArrayRecord:
    """Run rounds ``first_round..last_round`` and return the final global ArrayRecord (``config(round)`` rides
    along with every train and evaluate message of the round)."""
    for rnd in range(first_round, last_round + 1):
        start = time.perf_counter()
        log.info("round %d/%d: training", rnd, last_round)
        messages = strategy.configure_train(rnd, arrays, config(rnd), grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is None or len(new_arrays) == 0:
            raise RoundFailed(f"round {rnd}: the strategy produced no global model (no usable replies within "
                              f"{timeout:.0f}s; did the simulation backend start?)")
        arrays = new_arrays
        eval_messages = list(strategy.configure_evaluate(rnd, arrays, config(rnd), grid))
        eval_metrics = None
        if eval_messages:
            eval_metrics = strategy.aggregate_evaluate(rnd, grid.send_and_receive(messages=eval_messages,
                                                                                 timeout=timeout))
        on_round(rnd, arrays, train_metrics, eval_metrics, time.perf_counter() - start)
    return arrays
