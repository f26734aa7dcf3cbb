"""Session-wide Kafka fixtures; broker selection lives in tests/kafka_broker.py."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from kafka_broker import bootstrap_servers_for_tests, create_topics


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real broker: $KAFKA_BOOTSTRAP_SERVERS, a container, or scripts/kafka-local."""
    with bootstrap_servers_for_tests() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[object]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="embedwatch-tests-admin")
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def fresh_topic_prefix(request: pytest.FixtureRequest) -> str:
    """A per-test prefix, e.g. ``test-my-test-1a2b3c4d``; legal as a topic or group name."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:60]
    return f"test-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def unique_topics(
    request: pytest.FixtureRequest, fresh_topic_prefix: str
) -> Iterator[Callable[..., list[str]]]:
    """Factory for topic names unique to this test; created topics are deleted afterwards.

    ``unique_topics("events", "alerts", partitions=3)`` -> ``["<prefix>-events", "<prefix>-alerts"]``,
    created and ready. Pass ``create=False`` for names only (e.g. to test auto-creation).
    """
    created: list[str] = []
    admins: list[object] = []

    def make(*suffixes: str, partitions: int = 3, create: bool = True) -> list[str]:
        names = [f"{fresh_topic_prefix}-{suffix}" for suffix in suffixes or ("topic",)]
        if create:
            # Looked up lazily: tests that only need names must not start a broker.
            admins[:] = [request.getfixturevalue("kafka_admin")]
            create_topics(admins[0], names, partitions=partitions)
            created.extend(names)
        return names

    yield make

    if created:
        # Best effort: a leftover topic only costs disk in a throw-away broker.
        with contextlib.suppress(Exception):
            admins[0].delete_topics(created)  # type: ignore[attr-defined]
