"""Flower's own strategies (FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg, Krum) plus compactfl's hooks.

:class:`CompactflHooks` is mixed in front of each Flower strategy class; aggregation itself stays Flower's.
The hooks:
- transport: the strategy keeps an fp32 master ``ArrayRecord``; messages carry it cast to
  ``transport.dtype`` (FedOpt's ``current_arrays`` therefore stay fp32);
- accounting: every ArrayRecord sent and received is measured (:mod:`server.accounting`);
- validation: every reply is checked (:mod:`server.validation`); failures and invalid replies are dropped
  with a log line naming the node and the reason and counted in the round's metrics;
- determinism: valid replies are sorted by partition id before aggregation (arrival order is random);
- ``min_train_nodes``: fewer valid replies stop the run with :class:`TooFewReplies`;
- the aggregated master is cast back to fp32 (FedAdam's NumPy update returns float64).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from pipeline.config import RunConfig
from pipeline.transport.wire import decode_record, encode_state, record_nbytes, to_numpy_record
from server.accounting import ByteLedger
from server.validation import ArraySpec, check_reply, expected_layout

log = logging.getLogger("compactfl.server")
#: numpy-valued strategy attributes that carry state across rounds (checkpointed).
STATE_ATTRS = ("m_t", "v_t")


class TooFewReplies(RuntimeError):
    """Fewer valid replies than ``engine.min_train_nodes``: the run stops (resume from the last checkpoint)."""


class CompactflHooks:
    """Mixin placed before a Flower strategy class (see the module docstring)."""

    transport_dtype: str = "fp32"
    ledger: ByteLedger
    round_report: dict[int, dict[str, Any]]
    _layout: dict[str, ArraySpec]

    def setup_hooks(self, transport_dtype: str) -> None:
        """Initialise the hook state (called by :func:`build_strategy`)."""
        self.transport_dtype = transport_dtype
        self.ledger = ByteLedger()
        self.round_report = {}
        self._layout = {}

    def _to_wire(self, server_round: int, arrays: ArrayRecord, messages: list[Message]) -> list[Message]:
        master = decode_record(arrays)
        self._layout = expected_layout(master, self.transport_dtype)
        wire = encode_state(master, self.transport_dtype)
        nbytes = record_nbytes(wire)
        for msg in messages:
            msg.content[self.arrayrecord_key] = wire
            self.ledger.sent(server_round, msg.metadata.dst_node_id, nbytes)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling and messages, with the arrays cast for transport and their bytes recorded."""
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        return self._to_wire(server_round, arrays, messages)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation messages (``engine.evaluate_fraction``), cast and counted like training."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        return self._to_wire(server_round, arrays, messages) if messages else messages

    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Valid replies (content decoded to fp32, sorted by partition id); logs and counts the rest."""
        good: list[tuple[float, int, Message]] = []
        failed = dropped = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                lines = [ln.strip() for ln in str(msg.error.reason).splitlines() if ln.strip()]
                log.warning("round %d: node %d failed: %s", server_round, node, (lines[-1] if lines else "?")[:300])
                continue
            arrays = msg.content.array_records.get(self.arrayrecord_key)
            if arrays is not None:
                self.ledger.received(server_round, node, record_nbytes(arrays))
            state, reason = check_reply(msg.content, self._layout, self.arrayrecord_key)
            if reason is not None:
                dropped += 1
                log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            msg.content = RecordDict({self.arrayrecord_key: to_numpy_record(state), "metrics": metrics})
            good.append((float(metrics.get("partition-id", 0)), node, msg))
        good.sort(key=lambda item: item[:2])
        self.round_report[server_round] = {"replies_ok": len(good), "replies_failed": failed,
                                           "replies_dropped": dropped}
        if len(good) < max(self.min_train_nodes, 1):
            raise TooFewReplies(
                f"round {server_round}: only {len(good)} valid replies ({failed} failed, {dropped} dropped), "
                f"engine.min_train_nodes={self.min_train_nodes}: stopping; fix the clients and rerun with "
                "resume: true to continue from the last checkpoint")
        return [m for *_, m in good]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then aggregate the valid replies with the Flower strategy's own rule."""
        valid = self.screen_replies(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        # the master stays fp32 (FedAdam's update comes back float64): a resumed run sees the same numbers
        return (to_numpy_record(decode_record(arrays)) if arrays is not None else None), metrics

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Strategy state that must survive a restart (e.g. FedAdam moments), flattened ``attr/key``."""
        out = {}
        for attr in STATE_ATTRS:
            value = getattr(self, attr, None)
            if isinstance(value, dict):
                out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_arrays`."""
        for attr in STATE_ATTRS:
            prefix = f"{attr}/"
            part = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if part:
                if not hasattr(self, attr):
                    raise ValueError(f"checkpoint holds {attr} but strategy {type(self).__name__} has no such state")
                setattr(self, attr, part)


class CompactflFedAvg(CompactflHooks, FedAvg):
    """FedAvg with compactfl's hooks."""


class CompactflFedProx(CompactflHooks, FedProx):
    """FedProx (clients add ``mu/2 ||w - w_global||^2``) with compactfl's hooks."""


class CompactflFedAdam(CompactflHooks, FedAdam):
    """FedAdam (server-side Adam on the aggregated update) with compactfl's hooks."""


class CompactflFedMedian(CompactflHooks, FedMedian):
    """Coordinate-wise median with compactfl's hooks."""


class CompactflFedTrimmedAvg(CompactflHooks, FedTrimmedAvg):
    """Trimmed mean with compactfl's hooks."""


class CompactflKrum(CompactflHooks, Krum):
    """Krum (Byzantine-robust selection) with compactfl's hooks."""


def build_strategy(cfg: RunConfig) -> CompactflHooks:
    """The Flower strategy named by ``engine.strategy``, with sampling and minimum-node settings."""
    eng = cfg.engine
    if eng.kind != "flower":
        raise ValueError(f"engine.kind must be 'flower' to build a Flower strategy, got {eng.kind!r}")
    common: dict[str, Any] = {
        "fraction_train": eng.fraction,
        "fraction_evaluate": eng.evaluate_fraction,
        "min_train_nodes": eng.min_train_nodes,
        "min_evaluate_nodes": 1 if eng.evaluate_fraction > 0 else 0,
        "min_available_nodes": min(eng.min_train_nodes, eng.clients),
    }
    if eng.min_train_nodes > eng.clients:
        raise ValueError(f"engine.min_train_nodes={eng.min_train_nodes} exceeds engine.clients={eng.clients}")
    kind = eng.strategy
    if kind == "fedavg":
        strategy: CompactflHooks = CompactflFedAvg(**common)
    elif kind == "fedprox":
        strategy = CompactflFedProx(**common, proximal_mu=eng.proximal_mu)
    elif kind == "fedadam":
        strategy = CompactflFedAdam(**common, eta=eng.server_lr, eta_l=cfg.train.lr)
    elif kind == "fedmedian":
        strategy = CompactflFedMedian(**common)
    elif kind == "fedtrimmedavg":
        strategy = CompactflFedTrimmedAvg(**common, beta=eng.trimmed_beta)
    elif kind == "krum":
        strategy = CompactflKrum(**common, num_malicious_nodes=eng.krum_byzantine)
    else:  # pragma: no cover - the config schema only admits the names above
        raise ValueError(f"engine.strategy: unknown strategy {kind!r}")
    strategy.setup_hooks(cfg.transport.dtype)
    return strategy
