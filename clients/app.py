"""The Flower ClientApp (Message API): ``flwr run .`` and ``compactfl run`` (flower engine) both load ``app``.

A train message carries the global trainable state (``arrays``) and a ConfigRecord (``config``) naming the
server's resolved run config by hash; the first message to a node also carries the JSON, which the node
caches in its ``Context.state`` (a node without it, e.g. restarted, answers with an error that asks the server
to resend it), so every node trains with exactly the server's config, and the
round's learning rates (one per local epoch: the server applies the run's schedule on the global epoch count,
clients never restart a schedule). The partition comes from the node config (``partition-id`` /
``num-partitions``), set by the simulation or by ``flower-supernode --node-config``; a deployed node
(``data-dir`` in its node config) reads its data, teacher and generator only from its node config
(``clients/node_config.py``), never from paths in the message. Replies carry only the trainable state,
cast to ``transport.dtype`` (or, with a ``transport.codec`` chain, the encoded update ``trained - base``:
``clients/transport_client.py``), plus metrics including the bytes received and sent. ExpandNets under
``transport.communicate: compact`` receive and send the compact wire layout and keep their own factors
(``pipeline/transport/compact_space.py``). A train message also
carries the server's transport header (format version, codec chain, dtype): a node refuses a mismatch with
its own run config, with the reason, as an error reply. Every message also carries the run key: the node
keeps its state across rounds in that run's own folder (``node_state_folder``) and refuses a malformed key.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.flower_client import local_evaluate, local_train
from clients.node_config import NodeSettings, node_run_config, node_state_folder, read_node_settings
from clients.transport_client import check_message_header, node_receiver, outgoing_arrays, received_state
from pipeline.transport.downlink import BASE_KEY
from pipeline.transport.node_store import check_run_key
from pipeline.transport.wire import (
    CONFIG_HASH_KEY,
    CONFIG_KEY,
    CONFIG_MISSING,
    LRS_KEY,
    RUN_KEY,
    config_from_json,
    config_hash,
    decode_record,
    record_nbytes,
)

app = ClientApp()
CONFIG_CACHE = "compactfl-config-cache"


def _inputs(msg: Message, context: Context) -> tuple[Any, ArrayRecord, NodeSettings]:
    """The run config this node trains under (server paths replaced by the node's own files when deployed),
    the received arrays, and this node's settings."""
    node = read_node_settings(dict(context.node_config))
    return node_run_config(config_from_json(run_config_json(msg, context)), node), msg.content["arrays"], node


def message_run_key(msg: Message) -> str:
    """The run key a message names (the run this node's stored state belongs to); a one-line refusal when it is
    missing or malformed."""
    try:
        return check_run_key(msg.content["config"].get(RUN_KEY), f"message config {RUN_KEY!r}")
    except ValueError as exc:
        raise ValueError(f"node refuses the server's message: {exc}") from None


def run_config_json(msg: Message, context: Context) -> str:
    """The run config JSON a message names: carried by the message (then cached by its hash) or cached."""
    config = msg.content["config"]
    cache = context.state.config_records.get(CONFIG_CACHE)
    if cache is None:
        cache = context.state[CONFIG_CACHE] = ConfigRecord()
    if CONFIG_KEY in config:
        text = str(config[CONFIG_KEY])
        named = str(config.get(CONFIG_HASH_KEY, config_hash(text)))
        if named != config_hash(text):
            raise ValueError(f"message config: {CONFIG_HASH_KEY} {named!r} does not match the config it carries")
        cache.clear()  # one run config per node
        cache[named] = text
        return text
    if CONFIG_HASH_KEY not in config:
        raise ValueError(f"message config lacks {CONFIG_KEY!r} (was it sent by the compactfl ServerApp?)")
    named = str(config[CONFIG_HASH_KEY])
    if named not in cache:
        raise ValueError(f"{CONFIG_MISSING}: this node holds no run config {named} (the server resends it)")
    return str(cache[named])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition and reply with the new trainable state."""
    cfg, received, node = _inputs(msg, context)
    pid, n = node.partition_id, node.num_partitions
    config = msg.content["config"]
    if LRS_KEY not in config:
        raise ValueError(f"train message config lacks {LRS_KEY!r} (was it sent by the compactfl ServerApp?)")
    server_round = int(config["server-round"])
    check_message_header(config, cfg, server_round)
    folder = node_state_folder(cfg, node, message_run_key(msg))
    base = received_state(cfg, config, received, server_round=server_round, state_folder=folder)
    state, metrics = local_train(cfg, base, partition_id=pid, num_partitions=n,
                                 server_round=server_round, lrs=[float(x) for x in config[LRS_KEY]],
                                 proximal_mu=float(config.get("proximal-mu", 0.0)),
                                 receive=node_receiver(cfg, server_round=server_round, state_folder=folder))
    reply, _groups = outgoing_arrays(cfg, base, state, partition_id=pid, server_round=server_round,
                                     state_folder=folder)
    if cfg.transport.downlink.kind == "delta":
        metrics[BASE_KEY] = server_round  # the round of the model this update is measured against
    metrics.update({"partition-id": pid, "bytes-received": record_nbytes(received), "bytes-sent": record_nbytes(reply)})
    return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the finalised global model on this node's shard of the test set."""
    message_run_key(msg)  # a message of no compactfl run (or a corrupted one) is refused like a train message
    cfg, received, node = _inputs(msg, context)
    pid, n = node.partition_id, node.num_partitions
    metrics = local_evaluate(cfg, decode_record(received), partition_id=pid, num_partitions=n)
    metrics.update({"partition-id": pid, "bytes-received": record_nbytes(received)})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
