"""A Flower Grid in memory for benchmarks: the real round loop against real site handlers.

`MemoryGrid` hands each instruction the coordinator pushes straight to its node's real
ClientApp handler (`client.client_app`: training with DP-SGD at the site, the egress
guard, secure aggregation, the privacy ledger), in this process, as Flower's
`InMemoryGrid` does for simulations, and keeps the global model of every round as the
sites received it, so a benchmark can score each round on data it holds centrally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import numpy as np
from flwr.app import Context, Error, Message, MessageType, RecordDict

from medfed.client import client_app
from medfed.model import wire

Handler = Callable[[Message, Context], Message]
HANDLERS: Mapping[str, Handler] = {
    MessageType.QUERY: client_app.query,
    MessageType.TRAIN: client_app.train,
    MessageType.EVALUATE: client_app.evaluate,
    wire.SECAGG_KEYS: client_app.secagg_keys,
    wire.SECAGG_REVEAL: client_app.secagg_reveal,
}


def site_contexts(site_tomls: Iterable[Path], *, first_node: int = 7_000) -> dict[int, Context]:
    """A SuperNode context per site, naming its site.toml as `medfed site start` does."""
    return {
        first_node + 13 * index: Context(
            run_id=1,
            node_id=first_node + 13 * index,
            node_config={"site-config": str(path)},
            state=RecordDict(),
            run_config={},
        )
        for index, path in enumerate(site_tomls)
    }


@dataclass
class MemoryGrid:
    """Instructions go to the nodes' handlers in-process; replies wait to be pulled."""

    contexts: Mapping[int, Context]
    models: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """The global model per group id (round) as the sites received it for training;
    `final` is the one sent for the closing evaluation."""
    _replies: dict[str, Message] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's InMemoryGrid
            kind = message.metadata.message_type
            handler = HANDLERS.get(kind)
            if handler is None:
                reply = Message(Error(code=0, reason="no handler"), reply_to=message)
            else:
                self._keep_model(kind, message)
                reply = handler(message, self.contexts[message.metadata.dst_node_id])
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def _keep_model(self, kind: str, message: Message) -> None:
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            return
        if wire.ARRAYS not in message.content.array_records:
            return
        key = message.metadata.group_id if kind == MessageType.TRAIN else "final"
        if key not in self.models:
            self.models[key] = wire.record_to_arrays(message.content)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
