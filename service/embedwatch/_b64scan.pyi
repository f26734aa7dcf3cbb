"""Types of the C extension ``_b64scan.c`` (see there and ``Decoder._scan_pass``)."""

from collections.abc import Callable
from typing import Any

def scan(
    messages: list[Any],
    query_topics: frozenset[str],
    default_segment: str,
    max_message: int,
    max_bytes: int,
    max_id: int,
    ts_max: float,
    now: float | None,
    default_ts: Callable[[Any, float | None], float],
    /,
) -> tuple[list[int], list[tuple[Any, ...]]]: ...
