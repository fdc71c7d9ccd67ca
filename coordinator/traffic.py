"""What each exchange with the sites weighed: one JSON line per exchange.

`coordinator.messages.exchange` logs an `ExchangeTraffic` on the `medfed.coordinator.traffic`
logger (INFO) after each exchange: its group (the round, `<round>.<step>` for a secure step,
`status-<round>` for the status query before a round, `final` for the final evaluation),
the messages pushed, the replies received, their payload bytes and the seconds it took.
While a training run goes, the ServerApp appends these lines to `traffic.jsonl` in the run
folder, where `medfed bench scale` reads them.

Payload bytes: every array's data, and every config and metric record as Flower serializes
it. Left out: message metadata, the transport's framing (Flower's object headers, gRPC,
TLS) and what Flower sends on its own (heartbeats, polling). Counted only while something
listens on the logger, so a run that writes no traffic file pays nothing for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

TRAFFIC_LOGGER = "medfed.coordinator.traffic"
TRAFFIC_NAME = "traffic.jsonl"
"""The traffic file's name in the run folder."""

_ROUND_GROUP = re.compile(r"(?:status-)?(\d+)(?:\.\w+)?")

log = logging.getLogger(TRAFFIC_LOGGER)


@dataclass(frozen=True)
class ExchangeTraffic:
    """One exchange, from the coordinator's side: `to_sites_bytes` is what it pushed (what
    the sites received), `from_sites_bytes` what came back in replies before the timeout."""

    group: str
    message_type: str
    messages: int
    replies: int
    to_sites_bytes: int
    from_sites_bytes: int
    seconds: float = 0.0
    """From the first push to the last reply (or the timeout): what the exchange took."""

    @property
    def round(self) -> int | None:
        """The round the exchange belongs to; None for other groups (`final`, `ask-<step>`)."""
        found = _ROUND_GROUP.fullmatch(self.group)
        return int(found.group(1)) if found else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> ExchangeTraffic:
        """Parse one line (ValueError, KeyError or TypeError if it is not one)."""
        fields = json.loads(line)
        return cls(
            group=str(fields["group"]),
            message_type=str(fields["message_type"]),
            messages=int(fields["messages"]),
            replies=int(fields["replies"]),
            to_sites_bytes=int(fields["to_sites_bytes"]),
            from_sites_bytes=int(fields["from_sites_bytes"]),
            seconds=float(fields.get("seconds", 0.0)),
        )


def counting() -> bool:
    """Whether anything listens for traffic lines (the bytes are counted only then)."""
    return log.isEnabledFor(logging.INFO)


def log_exchange(traffic: ExchangeTraffic) -> None:
    log.info("%s", traffic.to_json())


@contextlib.contextmanager
def traffic_written_to(path: Path) -> Iterator[None]:
    """While the block runs, append every exchange's line to `path` (created on the first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def read_traffic(path: Path) -> list[ExchangeTraffic]:
    """The exchanges in a traffic file, in order; none if it is missing. A line that is not
    one (a run killed while writing it) is left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    exchanges = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            exchanges.append(ExchangeTraffic.from_json(line))
    return exchanges
