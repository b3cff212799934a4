"""Flower's own strategies (FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, and
the server-side DP clipping wrappers) plus compactfl's hooks.

:class:`CompactflHooks` is mixed in front of each Flower strategy class (or of Flower's DP wrapper, which
then wraps a plain Flower strategy); aggregation itself stays Flower's. The hooks:
- transport: the strategy keeps an fp32 master ``ArrayRecord``; messages carry it cast to
  ``transport.dtype`` (FedOpt's ``current_arrays`` therefore stay fp32), or with the ``delta`` downlink the
  change of the shadow model to nodes that hold its previous round (:mod:`server.downlink`); the run config
  JSON goes only into the first message to each node (resent when a node reports it missing);
- accounting: every ArrayRecord sent and received is measured (:mod:`server.accounting`);
- decoding: with a ``transport.codec`` chain a train reply is an encoded update; it is decoded (header,
  parts, shapes, finiteness checked) into the fp32 state ``base + update`` before anything else looks at it,
  and a reply that does not decode is dropped with the reason and the node named;
- screening, train and evaluate replies alike: structure, arrays and metrics (:mod:`server.validation`);
  a node keeps the ``partition-id`` of its first accepted reply and a partition claimed by two nodes in one
  round is believed for neither; weights are capped
  (:mod:`server.example_weights`); updates are bounded against the round's median norm
  (:mod:`server.update_screen`). Failed and refused replies are dropped with a log line naming the node and
  the reason, and counted in the round's report. The strategy (and a DP wrapper, which therefore clips and
  adds noise after decoding and screening) sees only clean replies carrying ``base + screened update`` and a
  MetricRecord with exactly the keys it expects;
- determinism: valid replies are sorted by partition id before aggregation (arrival order is random);
- ``min_train_nodes`` (and Bulyan's 4f+3): fewer valid replies stop the run with :class:`TooFewReplies`;
- the aggregated master is cast back to fp32 (FedAdam's NumPy update returns float64).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from pipeline.config import RunConfig
from pipeline.data import DataError
from pipeline.transport.downlink import BASE_KEY, BASE_MISMATCH, KIND_KEY
from pipeline.transport.wire import (
    CONFIG_KEY,
    CONFIG_MISSING,
    decode_record,
    encode_state,
    message_nbytes,
    record_group_nbytes,
    record_nbytes,
    to_numpy_record,
)
from server.accounting import ByteLedger
from server.downlink import DeltaDownlink
from server.example_weights import SizeOf, capped_weights, partition_sizes
from server.update_screen import screen_updates
from server.validation import (
    EVALUATE_METRICS,
    WEIGHT_KEY,
    ArraySpec,
    ReplyRejected,
    check_evaluate_content,
    check_train_arrays,
    check_train_update,
    clean_metrics,
    expected_layout,
    partition_of,
    train_metrics,
)

log = logging.getLogger("compactfl.server")
#: numpy-valued strategy attributes that carry state across rounds (checkpointed).
STATE_ATTRS = ("m_t", "v_t")
#: float strategy attributes that change across rounds (DP adaptive clipping's norm; checkpointed).
SCALAR_ATTRS = ("clipping_norm",)
ARRAYS_KEY = "arrays"


class TooFewReplies(RuntimeError):
    """Fewer valid replies than ``engine.min_train_nodes``: the run stops (resume from the last checkpoint)."""


@dataclass
class _Accepted:
    """A reply that passed the structural and metric checks."""

    node: int
    partition: int
    msg: Message
    metrics: dict[str, float | int]
    state: dict[str, torch.Tensor] | None = None


class CompactflHooks:
    """Mixin placed before a Flower strategy class (see the module docstring)."""

    transport_dtype: str = "fp32"
    ledger: ByteLedger
    round_report: dict[int, dict[str, Any]]
    _layout: dict[str, ArraySpec]
    _base: dict[str, torch.Tensor]

    def setup_hooks(self, cfg: RunConfig, min_valid: int) -> None:
        """Initialise the hook state (called by :func:`build_strategy`)."""
        eng = cfg.engine
        self.transport_dtype = cfg.transport.dtype
        self.screen = eng.update_screen
        self.weight_rule = eng.example_weights
        self.dp_kind = eng.dp.kind
        self.min_valid = max(min_valid, 1)
        self.ledger = ByteLedger()
        self.round_report = {}
        self._layout, self._base = {}, {}
        self._cfg = cfg
        self._train_metrics = train_metrics(cfg)
        self._node_partition: dict[int, int] = {}
        self._config_sent: set[int] = set()  # nodes that were sent the run config JSON (they cache it by hash)
        self.downlink = DeltaDownlink(cfg.transport, cfg.seed) if cfg.transport.downlink.kind == "delta" else None
        self.set_num_partitions(eng.clients)

    def set_num_partitions(self, num_partitions: int) -> None:
        """How many partitions the nodes split the data into (``num-partitions`` of the node config)."""
        self.num_partitions = int(num_partitions)
        self._size_of: SizeOf | None = (partition_sizes(self._cfg, self.num_partitions)
                                        if self.weight_rule == "partition" else None)

    def _to_wire(self, server_round: int, arrays: ArrayRecord, messages: list[Message],
                 train: bool = False) -> list[Message]:
        master = decode_record(arrays)
        self._layout = expected_layout(master, self.transport_dtype)
        wire = encode_state(master, self.transport_dtype)
        delta = self.downlink if train else None
        if delta is not None:
            delta.advance(server_round, master)
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = ConfigRecord(dict(msg.content.config_records.get("config", ConfigRecord())))
            record = wire
            if delta is not None:  # the shadow's change to a node that holds the previous round, else the shadow
                record, kind, base_round = delta.payload(node)
                config[KIND_KEY], config[BASE_KEY] = kind, base_round
            if CONFIG_KEY in config:  # the run config travels once per node
                if node in self._config_sent:
                    del config[CONFIG_KEY]
                self._config_sent.add(node)
            msg.content = RecordDict({ARRAYS_KEY: record, "config": config})
            self.ledger.sent(server_round, node, record_nbytes(record), message_nbytes(msg))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling and messages, with the arrays cast for transport and their bytes recorded."""
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._base = decode_record(arrays)  # the model the clients start from: updates are measured against it
        return self._to_wire(server_round, arrays, messages, train=True)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation messages (``engine.evaluate_fraction``), cast and counted like training."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        return self._to_wire(server_round, arrays, messages) if messages else messages

    # ------------------------------------------------------------------------------------- screening
    def _accept(self, server_round: int, replies: Iterable[Message], train: bool) -> tuple[list[_Accepted], int, int]:
        """Replies that pass the structural, array and metric checks (sorted by partition), failed, dropped."""
        replies = list(replies)
        candidates: list[_Accepted] = []
        failed = dropped = 0
        what = "train" if train else "evaluate"
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                lines = [ln.strip() for ln in str(msg.error.reason).splitlines() if ln.strip()]
                log.warning("round %d: node %d failed: %s", server_round, node, (lines[-1] if lines else "?")[:300])
                if CONFIG_MISSING in str(msg.error.reason):
                    self._config_sent.discard(node)  # it asked for the run config: the next message carries it
                if BASE_MISMATCH in str(msg.error.reason) and self.downlink is not None:
                    self.downlink.forget(node)  # it lacks the base of the delta: the next message is the full model
                continue
            arrays = msg.content.array_records.get(ARRAYS_KEY)
            groups = (record_group_nbytes(arrays, self._cfg.transport,
                                          {k: tuple(v.shape) for k, v in self._base.items()}, server_round)
                      if arrays is not None and train else None)
            self.ledger.received(server_round, node, record_nbytes(arrays) if arrays is not None else 0,
                                 message_nbytes(msg), groups)
            try:
                if train and self._cfg.transport.codec:
                    state = check_train_update(msg.content, self._base, self._cfg.transport, server_round,
                                               ARRAYS_KEY)
                    record = next(iter(msg.content.metric_records.values()))
                    if self.downlink is not None and record.get(BASE_KEY) != server_round:
                        raise ReplyRejected(f"trained from base round {record.get(BASE_KEY)!r}, this round sent "
                                            f"round {server_round}")
                elif train:
                    state = check_train_arrays(msg.content, self._layout, ARRAYS_KEY)
                    record = next(iter(msg.content.metric_records.values()))
                else:
                    state, record = None, check_evaluate_content(msg.content)
                pid = partition_of(record, self.num_partitions)
                metrics = clean_metrics(record, self._train_metrics if train else EVALUATE_METRICS)
                if self._node_partition.get(node, pid) != pid:
                    raise ReplyRejected(f"claims partition-id {pid}, but its earlier replies used "
                                        f"{self._node_partition[node]}")
            except ReplyRejected as exc:
                dropped += 1
                log.warning("round %d: dropped reply from node %d (%s): %s", server_round, node, what, exc)
                continue
            candidates.append(_Accepted(node, pid, msg, metrics, state))
        claimants: dict[int, list[int]] = {}
        for c in candidates:
            claimants.setdefault(c.partition, []).append(c.node)
        accepted = []
        for c in candidates:  # two nodes claiming one partition: neither is believed (arrival order is random)
            if len(claimants[c.partition]) > 1:
                dropped += 1
                log.warning("round %d: dropped reply from node %d (%s): partition-id %d is claimed by nodes %s",
                            server_round, c.node, what, c.partition, sorted(claimants[c.partition]))
                continue
            self._node_partition[c.node] = c.partition
            accepted.append(c)
        accepted.sort(key=lambda a: (a.partition, a.node))
        if train and self.downlink is not None:  # a node that failed or never answered may lack this round's model
            self.downlink.settle(server_round, {m.metadata.src_node_id for m in replies if not m.has_error()})
        return accepted, failed, dropped

    def _cap_weights(self, accepted: list[_Accepted], split: str) -> int:
        """Replace each claimed ``num-examples`` by its capped weight; returns how many were lowered."""
        claims = [(a.partition, int(a.metrics[WEIGHT_KEY])) for a in accepted]
        try:
            weights = capped_weights(self.weight_rule, claims, split, self._size_of)
        except DataError as exc:  # a deployed server may hold no training split: the nodes hold their own
            log.warning("engine.example_weights=partition: the server cannot size the partitions (%s); capping "
                        "at the round's median claim instead", exc)
            self.weight_rule, self._size_of = "median", None
            weights = capped_weights(self.weight_rule, claims, split)
        capped = 0
        for a, (_, claim), weight in zip(accepted, claims, weights, strict=True):
            weight = max(int(weight), 1)
            if weight < claim:
                capped += 1
                if self.weight_rule != "uniform":
                    log.info("%s reply of node %d: num-examples %d capped to %d (%s rule)", split, a.node, claim,
                             weight, self.weight_rule)
            a.metrics[WEIGHT_KEY] = weight
        return capped

    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Valid train replies (screened, fp32 NumPy, sorted by partition id); logs and counts the rest."""
        accepted, failed, dropped = self._accept(server_round, replies, train=True)
        capped = self._cap_weights(accepted, "train")
        screened = screen_updates(self._base, [a.state for a in accepted], self.screen.kind, self.screen.factor,
                                  self.screen.direction, self.screen.backward_ratio, self.screen.min_agreement,
                                  self.screen.agreement_over_spread, self.screen.direction_min_replies)
        good, clipped = [], 0
        for a, result in zip(accepted, screened, strict=True):
            if result.state is not None and self.dp_kind != "none" and not any(result.norms.values()):
                # Flower's DP clipping divides by the update norm: a zero update would abort the run
                result.state, result.reason = None, "update is exactly zero (refused under engine.dp)"
            if result.state is None:
                dropped += 1
                log.warning("round %d: dropped reply from node %d (train): %s", server_round, a.node, result.reason)
                continue
            if result.action == "clipped":
                clipped += 1
                log.warning("round %d: clipped the update of node %d (norms %s)", server_round, a.node,
                            {g: round(n, 4) for g, n in result.norms.items()})
            a.msg.content = RecordDict({ARRAYS_KEY: to_numpy_record(result.state),
                                        "metrics": MetricRecord(dict(a.metrics))})
            good.append(a.msg)
        self.round_report[server_round] = {"replies_ok": len(good), "replies_failed": failed,
                                           "replies_dropped": dropped, "replies_clipped": clipped,
                                           "weights_capped": capped}
        if len(good) < self.min_valid:
            raise TooFewReplies(
                f"round {server_round}: only {len(good)} valid replies ({failed} failed, {dropped} dropped), "
                f"need {self.min_valid} (engine.min_train_nodes={self._cfg.engine.min_train_nodes}"
                f"{'; bulyan needs 4*krum_byzantine+3' if self._cfg.engine.strategy == 'bulyan' else ''}): "
                "stopping; fix the clients and rerun with resume: true to continue from the last checkpoint")
        return good

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, then aggregate the valid replies with the Flower strategy's own rule."""
        valid = self.screen_replies(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        # the master stays fp32 (FedAdam's update comes back float64): a resumed run sees the same numbers
        return (to_numpy_record(decode_record(arrays)) if arrays is not None else None), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Screen federated-evaluate replies like train replies (metrics, partition, weight), then aggregate."""
        accepted, failed, dropped = self._accept(server_round, replies, train=False)
        capped = self._cap_weights(accepted, "test")
        for a in accepted:
            a.msg.content = RecordDict({"metrics": MetricRecord(dict(a.metrics))})
        self.round_report.setdefault(server_round, {}).update(
            {"evaluate_replies_ok": len(accepted), "evaluate_replies_failed": failed,
             "evaluate_replies_dropped": dropped, "evaluate_weights_capped": capped})
        if not accepted:
            return None
        return super().aggregate_evaluate(server_round, [a.msg for a in accepted])  # type: ignore[misc]

    # ------------------------------------------------------------------------------------- state
    def _state_holders(self) -> list[Any]:
        inner = getattr(self, "strategy", None)  # Flower's DP wrappers hold the aggregating strategy
        return [self] + ([inner] if isinstance(inner, Strategy) else [])

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Strategy state that must survive a restart (FedAdam moments, DP adaptive clipping norm), ``attr/key``."""
        out: dict[str, np.ndarray] = self.downlink.state_arrays() if self.downlink is not None else {}
        for holder in self._state_holders():
            for attr in STATE_ATTRS:
                value = getattr(holder, attr, None)
                if isinstance(value, dict):
                    out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
            for attr in SCALAR_ATTRS:
                if isinstance(getattr(holder, attr, None), int | float):
                    out[f"{attr}/value"] = np.asarray(float(getattr(holder, attr)), dtype=np.float64)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_arrays`."""
        if self.downlink is not None:
            self.downlink.load_state_arrays(arrays)
        for attr in (*STATE_ATTRS, *SCALAR_ATTRS):
            prefix = f"{attr}/"
            part = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if not part:
                continue
            holder = next((h for h in self._state_holders() if hasattr(h, attr)), None)
            if holder is None:
                raise ValueError(f"checkpoint holds {attr} but strategy {type(self).__name__} has no such state")
            setattr(holder, attr, float(part["value"]) if attr in SCALAR_ATTRS else part)


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


class CompactflMultiKrum(CompactflHooks, MultiKrum):
    """MultiKrum (average of the Krum-best replies) with compactfl's hooks."""


class CompactflBulyan(CompactflHooks, Bulyan):
    """Bulyan (MultiKrum selection, then a trimmed coordinate-wise mean; needs 4f+3 replies) with the hooks."""


class CompactflDPFixed(CompactflHooks, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper around a plain Flower strategy, after compactfl's screen."""


class CompactflDPAdaptive(CompactflHooks, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive-clipping DP wrapper around a plain Flower strategy, after the screen."""


#: engine.strategy -> (compactfl class, plain Flower class)
STRATEGIES: dict[str, tuple[type, type]] = {
    "fedavg": (CompactflFedAvg, FedAvg), "fedprox": (CompactflFedProx, FedProx),
    "fedadam": (CompactflFedAdam, FedAdam), "fedmedian": (CompactflFedMedian, FedMedian),
    "fedtrimmedavg": (CompactflFedTrimmedAvg, FedTrimmedAvg), "krum": (CompactflKrum, Krum),
    "multikrum": (CompactflMultiKrum, MultiKrum), "bulyan": (CompactflBulyan, Bulyan),
}


def expected_replies(cfg: RunConfig) -> int:
    """Nodes sampled for training per round (Flower's rule: ``int(clients * fraction)``, at least min_train_nodes)."""
    return max(int(cfg.engine.clients * cfg.engine.fraction), cfg.engine.min_train_nodes)


def build_strategy(cfg: RunConfig) -> CompactflHooks:
    """The Flower strategy named by ``engine.strategy`` (wrapped by ``engine.dp``), with compactfl's hooks."""
    eng = cfg.engine
    if eng.kind != "flower":
        raise ValueError(f"engine.kind must be 'flower' to build a Flower strategy, got {eng.kind!r}")
    if eng.min_train_nodes > eng.clients:
        raise ValueError(f"engine.min_train_nodes={eng.min_train_nodes} exceeds engine.clients={eng.clients}")
    if eng.strategy not in STRATEGIES:  # pragma: no cover - the config schema only admits these names
        raise ValueError(f"engine.strategy: unknown strategy {eng.strategy!r}")
    args: dict[str, Any] = {
        "fraction_train": eng.fraction,
        "fraction_evaluate": eng.evaluate_fraction,
        "min_train_nodes": eng.min_train_nodes,
        "min_evaluate_nodes": 1 if eng.evaluate_fraction > 0 else 0,
        "min_available_nodes": min(eng.min_train_nodes, eng.clients),
    }
    f = eng.krum_byzantine
    args.update({"fedprox": {"proximal_mu": eng.proximal_mu},
                 "fedadam": {"eta": eng.server_lr, "eta_l": cfg.train.lr},
                 "fedtrimmedavg": {"beta": eng.trimmed_beta},
                 "krum": {"num_malicious_nodes": f},
                 "multikrum": {"num_malicious_nodes": f,
                               "num_nodes_to_select": eng.multikrum_select or max(expected_replies(cfg) - f, 1)},
                 "bulyan": {"num_malicious_nodes": f}}.get(eng.strategy, {}))
    hooked, plain = STRATEGIES[eng.strategy]
    min_valid = max(eng.min_train_nodes, 4 * f + 3 if eng.strategy == "bulyan" else 1)
    if eng.dp.kind == "none":
        strategy: CompactflHooks = hooked(**args)
    elif eng.dp.kind == "fixed":
        strategy = CompactflDPFixed(plain(**args), noise_multiplier=eng.dp.noise_multiplier,
                                    clipping_norm=eng.dp.clipping_norm, num_sampled_clients=expected_replies(cfg))
    else:
        strategy = CompactflDPAdaptive(plain(**args), noise_multiplier=eng.dp.noise_multiplier,
                                       num_sampled_clients=expected_replies(cfg),
                                       initial_clipping_norm=eng.dp.clipping_norm,
                                       target_clipped_quantile=eng.dp.target_quantile, clip_norm_lr=eng.dp.clip_norm_lr)
    strategy.setup_hooks(cfg, min_valid)
    return strategy
