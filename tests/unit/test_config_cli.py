"""Settings as the ``embedwatch`` commands apply them: blas_threads of the config file in the
offline commands, and what the help says of the admin token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from threadpoolctl import threadpool_info

from embedwatch import cli


def _blas_threads() -> list[int]:
    return [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.mark.parametrize("command", ["replay", "baseline build"])
def test_offline_commands_apply_blas_threads_of_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import embedwatch.replay as replay

    monkeypatch.delenv("EMBEDWATCH_BLAS_THREADS", raising=False)
    default = set(_blas_threads())
    assert default, "no BLAS library loaded"
    # Unlike the process's default (whatever the machine gives it) and unlike the 1 that main()
    # sets from EMBEDWATCH_BLAS_THREADS's default: only the file can have set it.
    want = 3 if 3 not in default else 4
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"blas_threads: {want}\n")
    seen: list[list[int]] = []

    def record(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        seen.append(_blas_threads())
        return []

    monkeypatch.setattr(replay, "run_replay", record)
    monkeypatch.setattr(replay, "build_baseline", record)
    events = tmp_path / "e.jsonl"
    events.write_text("")
    if command == "replay":
        argv = ["replay", str(events), "--report", str(tmp_path / "r.json"), "--config", str(cfg), "--quiet"]
    else:
        argv = ["baseline", "build", str(events), "-o", str(tmp_path / "b"), "--config", str(cfg)]
    assert cli.main(argv) == 0
    assert seen and seen[0] and set(seen[0]) == {want}, seen
    assert set(_blas_threads()) == default  # the process's default is back once the command is done


def test_baseline_help_names_the_token_only_for_mutations(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["baseline", "--help"])
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()
             if ln.strip().split(" ", 1)[0] in ("list", "promote", "rollback")}
    assert "EMBEDWATCH_HTTP__ADMIN_TOKEN" not in lines["list"], lines["list"]  # `list` sends none
    assert "token from EMBEDWATCH_HTTP__ADMIN_TOKEN" in lines["promote"]
    assert "token from EMBEDWATCH_HTTP__ADMIN_TOKEN" in lines["rollback"]


def test_remote_mutation_sends_the_token_without_surrounding_whitespace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The service drops a Secret file's newline from its token; the command does so too."""
    sent: list[tuple[str, str | None]] = []

    def fake_http(method: str, url: str, token: str | None = None, body: Any = None) -> dict[str, Any]:
        sent.append((method, token))
        return {}

    monkeypatch.setattr(cli, "_http", fake_http)
    monkeypatch.setenv("EMBEDWATCH_HTTP__ADMIN_TOKEN", "s3cret\n")
    assert cli.main(["baseline", "rollback", "m/1/default"]) == 0
    monkeypatch.setenv("EMBEDWATCH_HTTP__ADMIN_TOKEN", " \n")
    assert cli.main(["baseline", "rollback", "m/1/default"]) == 0
    assert sent == [("POST", "s3cret"), ("POST", None)]
