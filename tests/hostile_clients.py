"""Hostile Flower clients for tests and the robustness benchmark, planted without the production config
(``tests/fault_injection.py`` holds the crash / NaN / wrong-shape faults; this module the adversarial ones).

:func:`hostile_app` wraps the real ClientApp (``clients.app.app``): it calls it, then lets a tamper function
rewrite the reply of chosen partition ids. :func:`model_attack` builds the attacks of the robustness table
(scaled, sign-flipped and num-examples-inflating clients); tests pass their own tamper functions for
malformed replies.

Under a ``transport.codec`` chain a train reply is an encoded update, and the server screens it *decoded*. A
:class:`ModelAttack` then attacks it the way a real client that knows the public chain would: the hostile app
decodes the reply with the project's codec library (``record_to_update``, as the server does), scales the
decoded update, and re-encodes it with the same chain and header (``encode_update`` + ``update_to_record``),
so the server receives a valid message, decodes it and screens it. The re-encoding is lossy like any reply's
(top-k of the scaled update, a fresh stochastic quantisation seeded like the node's own); the node's
error-feedback residual stays the honest one (the attack is applied after the node stored it). Encoded
attacks assume the full downlink (the node's base is the global model its train message carries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from clients.app import app as honest_app
from clients.app import run_config_json
from pipeline.config import TransportConfig
from pipeline.transport.codecs import CodecContext
from pipeline.transport.update import encode_update
from pipeline.transport.wire import (
    UPDATE_KEY,
    config_from_json,
    decode_record,
    encode_state,
    record_to_update,
    update_to_record,
)

#: (the reply Message, the global state the node received) -> None; edits the reply in place
Tamper = Callable[[Message, dict[str, torch.Tensor]], None]
_TRANSPORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _is_bn_statistic(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var")


@dataclass(frozen=True)
class ModelAttack:
    """Reply ``base + multiplier * (honest - base)`` (BN statistics honest) and claim ``claim`` examples."""

    multiplier: float = 1.0
    claim: int | None = None

    def attacked_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``multiplier`` x each parameter update; BN running statistics' updates unchanged."""
        return {k: v if _is_bn_statistic(k) else self.multiplier * v for k, v in update.items()}

    def __call__(self, reply: Message, base: dict[str, torch.Tensor]) -> None:
        """Attack a dense reply (an encoded one needs the run's rules: :meth:`tamper_encoded`)."""
        arrays = reply.content["arrays"]
        if UPDATE_KEY in arrays:
            raise ValueError("ModelAttack: an encoded reply needs the run's transport rules (plant it with "
                             "hostile_app, which calls tamper_encoded)")
        dtype = _TRANSPORT[next(iter(arrays.values())).dtype]
        honest = decode_record(arrays)
        attacked = {k: v if _is_bn_statistic(k) else base[k] + self.multiplier * (v - base[k])
                    for k, v in honest.items()}
        reply.content["arrays"] = encode_state(attacked, dtype)
        self._claim(reply)

    def tamper_encoded(self, reply: Message, base: dict[str, torch.Tensor], transport: TransportConfig,
                       server_round: int, ctx: CodecContext) -> None:
        """Attack an encoded reply: decode it as the server does, scale the update, re-encode it with the same
        chain and header (error feedback off for the re-encoding: the header does not name it)."""
        layout = {k: tuple(v.shape) for k, v in base.items()}
        update = record_to_update(reply.content["arrays"], transport, layout, server_round)
        rules = transport.model_copy(update={"error_feedback": False})
        encoded = encode_update(self.attacked_update(update), rules, ctx)
        reply.content["arrays"] = update_to_record(encoded)
        self._claim(reply)

    def _claim(self, reply: Message) -> None:
        if self.claim is not None:
            reply.content["metrics"]["num-examples"] = int(self.claim)


#: the attacks of the robustness table: name -> tamper
ATTACKS: dict[str, ModelAttack] = {
    "scaled x10": ModelAttack(multiplier=10.0),
    "sign-flipped x5": ModelAttack(multiplier=-5.0),
    "flipped + 1000x num-examples": ModelAttack(multiplier=-1.0, claim=1_000_000),
}


def hostile_app(train: dict[int, Tamper] | None = None, evaluate: dict[int, Tamper] | None = None,
                inner: ClientApp = honest_app) -> ClientApp:
    """A ClientApp that runs ``inner`` and then tampers with the replies of the given partition ids."""
    app = ClientApp()
    train, evaluate = train or {}, evaluate or {}

    def run(tampers: dict[int, Tamper], msg: Message, context: Context) -> Message:
        base = decode_record(msg.content["arrays"])
        reply = inner(msg, context)
        pid = int(context.node_config["partition-id"])
        tamper = tampers.get(pid)
        if tamper is None or reply.has_error():
            return reply
        if isinstance(tamper, ModelAttack) and UPDATE_KEY in reply.content.array_records.get("arrays", {}):
            cfg = config_from_json(run_config_json(msg, context))  # the public run config the node holds
            server_round = int(msg.content["config"]["server-round"])
            tamper.tamper_encoded(reply, base, cfg.transport, server_round, CodecContext(cfg.seed, server_round, pid))
        else:
            tamper(reply, base)
        return reply

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return run(train, msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return run(evaluate, msg, context)

    return app


def set_metric(key: str, value: object) -> Tamper:
    """A tamper that sets one metric (bypassing MetricRecord's type check, as a hand-made message could)."""
    def tamper(reply: Message, _base: dict[str, torch.Tensor]) -> None:
        record: MetricRecord = reply.content["metrics"]
        record._data[key] = value  # noqa: SLF001 - a hostile peer is not bound by the constructor's checks
    return tamper


def drop_metric(key: str) -> Tamper:
    """A tamper that removes one metric."""
    def tamper(reply: Message, _base: dict[str, torch.Tensor]) -> None:
        del reply.content["metrics"][key]
    return tamper
