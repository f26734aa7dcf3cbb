"""Session fixture ``e2e``: one real Kafka + embedwatch + Prometheus + Alertmanager run shared by
every e2e test (the alert checks, promtool on a real scrape, every dashboard query). The
machinery and the scenario live in e2e_stack.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from e2e_stack import E2ERun, require_binaries, start_run


@pytest.fixture(scope="session")
def e2e_binaries() -> dict[str, str]:
    """prometheus, promtool, alertmanager, amtool: checked before a broker is started; missing
    binaries FAIL the tests (never skip)."""
    return require_binaries()


@pytest.fixture(scope="session")
def e2e(e2e_binaries: dict[str, str], kafka_bootstrap: str, kafka_admin: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ERun]:
    with start_run(kafka_bootstrap, kafka_admin, tmp_path_factory.mktemp("e2e"), e2e_binaries) as run:
        yield run
