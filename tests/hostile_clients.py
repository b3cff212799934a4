"""Hostile Flower clients for tests and the robustness benchmark, planted without the production config
(``tests/fault_injection.py`` holds the crash / NaN / wrong-shape faults; this module the adversarial ones).

:func:`hostile_app` wraps the real ClientApp (``clients.app.app``): it calls it, then lets a tamper function
rewrite the reply of chosen partition ids. :func:`model_attack` builds the attacks of the robustness table
(scaled, sign-flipped and num-examples-inflating clients); tests pass their own tamper functions for
malformed replies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from clients.app import app as honest_app
from pipeline.transport.wire import decode_record, encode_state

#: (the reply Message, the global state the node received) -> None; edits the reply in place
Tamper = Callable[[Message, dict[str, torch.Tensor]], None]
_TRANSPORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class ModelAttack:
    """Reply ``base + multiplier * (honest - base)`` (BN statistics honest) and claim ``claim`` examples."""

    multiplier: float = 1.0
    claim: int | None = None

    def __call__(self, reply: Message, base: dict[str, torch.Tensor]) -> None:
        arrays = reply.content["arrays"]
        dtype = _TRANSPORT[next(iter(arrays.values())).dtype]
        honest = decode_record(arrays)
        attacked = {k: v if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")
                    else base[k] + self.multiplier * (v - base[k]) for k, v in honest.items()}
        reply.content["arrays"] = encode_state(attacked, dtype)
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
        tamper = tampers.get(int(context.node_config["partition-id"]))
        if tamper is not None and not reply.has_error():
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
