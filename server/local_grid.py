"""An in-process Flower ``Grid``: runs a ClientApp synchronously for each message, without Ray or a SuperLink.

For tests and debugging of the ServerApp logic (validation, accounting, checkpoints, resume) in seconds,
and as a "Flower messages without Ray" point in the federated benchmark. Each message gets a deep copy of
its content (as if it had been serialised), node ids are stable (``1000 + partition id``), the server's RNG
states are restored after each client (clients seed their own RNGs, as they would in their own process),
and a ClientApp that raises produces an error reply exactly as the simulation runtime does.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from pipeline.checkpoint import capture_rng, restore_rng

NODE_ID_BASE = 1000
CLIENT_APP_EXCEPTION = 1  # error code for "the ClientApp raised"


class LocalGrid(Grid):
    """``num_nodes`` virtual nodes (partition ids 0..N-1) served by one ClientApp in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        if num_nodes < 1:
            raise ValueError(f"LocalGrid needs at least one node, got num_nodes={num_nodes}")
        self.client_app = client_app
        self.contexts = {
            NODE_ID_BASE + i: Context(run_id=0, node_id=NODE_ID_BASE + i,
                                      node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id=0)
        if TaskIdentity._run_id is None:  # messages read the sender identity (set by Flower's runtimes)
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 1, SUPERLINK_NODE_ID
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Set the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message to ``dst_node_id`` (Flower's deprecated helper, kept for the Grid interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the virtual nodes."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp on every message now; replies wait for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}")
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            delivered = Message(content=copy.deepcopy(msg.content), metadata=copy.deepcopy(msg.metadata))
            rng = capture_rng()
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - a failing ClientApp becomes an error reply, as in Flower
                reply = Message(Error(code=CLIENT_APP_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=delivered)
            finally:
                restore_rng(rng)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` (each returned once)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, run and pull in one call (``timeout`` is irrelevant in-process)."""
        return self.pull_messages(self.push_messages(messages))
