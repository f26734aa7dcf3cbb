"""docs/api.md's examples run as written: its jq filters against a served /api/streams, its CLI
lines against the CLI's parser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedwatch.api import Backend, HttpServer
from embedwatch.cli import build_parser
from embedwatch.exporter import Exporter, make_registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
STREAM = "all-MiniLM-L6-v2/2024-05-01/web-search"


@pytest.fixture
def streams_json() -> Iterator[bytes]:
    """The body of GET /api/streams from the HTTP server, for one stream collecting a promotion."""
    state = {STREAM: {"events": 182340, "drifting": True, "promotion": {"events": 640, "needed": 1000}}}
    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=lambda: state, baselines=lambda s: [],
                      promote=lambda k, b, n: {}, rollback=lambda k: {}, admin_token="t")
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/streams", timeout=5) as resp:
            yield resp.read()
    finally:
        srv.stop()


def _jq_examples() -> list[tuple[str, object]]:
    """Each ``curl .../api/streams | jq '<filter>'`` of the doc with the JSON of the comment after it."""
    lines = DOC.read_text().splitlines()
    out: list[tuple[str, object]] = []
    for i, line in enumerate(lines):
        m = re.search(r"/api/streams \| jq '([^']+)'", line)
        if m:
            comment = lines[i + 1].lstrip("# ").split("  ")[0]
            out.append((m.group(1), json.loads(comment)))
    return out


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_the_jq_examples_print_what_the_doc_says(streams_json: bytes) -> None:
    examples = _jq_examples()
    assert len(examples) == 2
    for expr, want in examples:
        got = subprocess.run(["jq", "-c", expr], input=streams_json, capture_output=True, check=True).stdout
        assert json.loads(got) == want, expr


def test_the_cli_lines_parse_as_documented() -> None:
    text = " ".join(DOC.read_text().split())
    commands = re.findall(r"`(embedwatch baseline [^`]+)`", text)
    assert commands, "no CLI line in docs/api.md"
    parser = build_parser()
    for command in commands:
        argv = command.split()[1:]
        actions = argv[1].split("|")
        for action in actions:
            args = parser.parse_args([argv[0], action, *argv[2:]])
            assert args.action == action and args.url == "http://embedwatch:9108"


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_the_jq_line_that_finds_streams_to_forget_lists_the_streams_not_monitored() -> None:
    (expr,) = re.findall(r"/api/baselines \\\s*\|\s*jq -r '([^']+)'", DOC.read_text())
    here = {"m/1/default": False, "m/1/default/query": False, "m/2/default": True, "m/3/web/query": False}
    listed = [{"stream": k, "monitored_here": v} for k, v in here.items()]
    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=dict, baselines=lambda s: listed, promote=lambda k, b, n: {},
                      rollback=lambda k: {}, admin_token="t")
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/baselines", timeout=5) as resp:
            body = resp.read()
    finally:
        srv.stop()
    out = subprocess.run(["jq", "-r", expr], input=body, capture_output=True, check=True).stdout.decode()
    assert out.split() == ["m/1/default", "m/3/web"]
