"""The Helm chart (helm/embedwatch): lint, render, validate offline, and check what it renders.

Tools: helm and kubeconform come from scripts/install-tools (pinned, built with `go install` into
.cache/tools/bin, or $EMBEDWATCH_CACHE_DIR/tools/bin); the session fixture runs it, so a fresh
checkout needs nothing by hand (only Go and the Go module proxy).

Schemas, all offline:
- built-in kinds: the JSON schemas bundled in the PyPI package kubernetes-validate, rewritten once
  per session into a directory kubeconform can read (their `$ref`s point at
  https://kubernetes.io/api/_definitions.json; we make them relative to the local file and drop
  the `$id`s), then `kubeconform -strict -kubernetes-version 1.31.0`;
- ServiceMonitor / PrometheusRule / ScaledObject: <project>/../shared/schemas (CRDs-catalog
  layout), both through kubeconform and directly with python jsonschema.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "embedwatch"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas"
RULES_FILE = ROOT / "alerts" / "embedwatch-rules.yml"
DASHBOARDS_DIR = ROOT / "dashboards"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "ew", "ml"

CR_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com/prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
}


# ------------------------------------------------------------------------------------ fixtures
def _cache_dir() -> Path:
    return Path(os.environ.get("EMBEDWATCH_CACHE_DIR", ROOT / ".cache"))


@pytest.fixture(scope="session")
def tools() -> dict[str, Path]:
    """helm and kubeconform, installed (idempotently, cached) by scripts/install-tools."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / "install-tools")], capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/install-tools failed:\n{proc.stdout}\n{proc.stderr}")
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    found = {name: bin_dir / name for name in ("helm", "kubeconform")}
    for name, path in found.items():
        assert path.is_file(), f"scripts/install-tools did not produce {path} ({name})"
    return found


@pytest.fixture(scope="session")
def k8s_schema_dir() -> Path:
    """kubernetes-validate's bundled strict schemas for KUBE_VERSION, made loadable by kubeconform."""
    import kubernetes_validate

    src = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
           / f"v{KUBE_VERSION}-local-strict")
    assert src.is_dir(), f"kubernetes-validate ships no schemas for {KUBE_VERSION} ({src})"
    version = getattr(kubernetes_validate, "__version__", "x")
    base = _cache_dir() / "kubeconform-schemas" / f"kubernetes-validate-{version}"
    dst = base / f"v{KUBE_VERSION}-local-strict"
    marker = dst / ".complete"
    if not marker.exists():
        tmp = base / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in src.glob("*.json"):
            text = f.read_text(encoding="utf-8").replace('"/api/_definitions.json#', '"_definitions.json#')
            doc = json.loads(text)
            doc.pop("$id", None)  # let refs resolve against the local file, not kubernetes.io
            (tmp / f.name).write_text(json.dumps(doc), encoding="utf-8")
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return base


def helm(tools: dict[str, Path], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(tools["helm"]), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(tools: dict[str, Path], *args: str) -> str:
    return helm(tools, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                "--kube-version", KUBE_VERSION, *args).stdout


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def default_text(tools: dict[str, Path]) -> str:
    return render(tools)


@pytest.fixture(scope="session")
def all_text(tools: dict[str, Path]) -> str:
    return render(tools, "-f", str(ALL_FEATURES))


@pytest.fixture(scope="session")
def default_docs(default_text: str) -> list[dict[str, Any]]:
    return docs_of(default_text)


@pytest.fixture(scope="session")
def all_docs(all_text: str) -> list[dict[str, Any]]:
    return docs_of(all_text)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------- lint, validate
@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["default", "all-features"])
def test_helm_lint_strict(tools: dict[str, Path], values: Path | None) -> None:
    args = ["lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART)]
    if values:
        args += ["-f", str(values)]
    out = helm(tools, *args).stdout
    assert "0 chart(s) failed" in out, out


def test_all_features_renders_every_kind(all_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in all_docs}
    assert kinds >= {
        "Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget", "ServiceMonitor",
        "PrometheusRule", "ScaledObject", "NetworkPolicy", "PersistentVolumeClaim",
    }, kinds


def test_default_renders_no_optional_crs(default_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in default_docs}
    assert kinds == {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"}, kinds


@pytest.mark.parametrize("which", ["default_text", "all_text"])
def test_kubeconform_strict(
    request: pytest.FixtureRequest, tools: dict[str, Path], k8s_schema_dir: Path, tmp_path: Path, which: str
) -> None:
    assert SHARED_SCHEMAS.is_dir(), f"CRD schemas not found at {SHARED_SCHEMAS}"
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(request.getfixturevalue(which), encoding="utf-8")
    proc = subprocess.run(
        [str(tools["kubeconform"]), "-strict", "-summary", "-output", "json",
         "-kubernetes-version", KUBE_VERSION,
         "-schema-location",
         f"{k8s_schema_dir}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}/"
         "{{ .ResourceKind }}{{ .KindSuffix }}.json",
         "-schema-location",
         f"{SHARED_SCHEMAS}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
         str(manifest)],
        capture_output=True, text=True, timeout=120,
    )
    report = json.loads(proc.stdout)
    summary = report["summary"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every resource must have been checked against a schema: none skipped / unknown
    assert summary["valid"] == len(docs_of(manifest.read_text())), summary
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0, summary


@pytest.mark.parametrize("which", ["default_docs", "all_docs"])
def test_builtin_kinds_validate_with_kubernetes_validate(request: pytest.FixtureRequest, which: str) -> None:
    import kubernetes_validate

    for doc in request.getfixturevalue(which):
        if (doc["apiVersion"], doc["kind"]) in CR_SCHEMAS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_custom_resources_validate_against_shared_schemas(all_docs: list[dict[str, Any]]) -> None:
    seen = set()
    for doc in all_docs:
        key = (doc["apiVersion"], doc["kind"])
        if key not in CR_SCHEMAS:
            continue
        schema = json.loads((SHARED_SCHEMAS / CR_SCHEMAS[key]).read_text(encoding="utf-8"))
        jsonschema.validators.validator_for(schema)(schema).validate(doc)
        seen.add(key)
    assert seen == set(CR_SCHEMAS), f"not rendered: {set(CR_SCHEMAS) - seen}"


# ------------------------------------------------------------------------------ security, probes
@pytest.mark.parametrize("which", ["default_docs", "all_docs"])
def test_security_context(request: pytest.FixtureRequest, which: str) -> None:
    docs = request.getfixturevalue(which)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # read-only root: /tmp is an emptyDir
    tmp_mount = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp_mount, "no volume at /tmp"
    vol = next(v for v in pod["volumes"] if v["name"] == tmp_mount[0]["name"])
    assert "emptyDir" in vol


@pytest.mark.parametrize("which", ["default_docs", "all_docs"])
def test_probes_ports_and_grace(request: pytest.FixtureRequest, which: str) -> None:
    docs = request.getfixturevalue(which)
    c = container(docs)
    assert c["ports"] == [{"name": "http-metrics", "containerPort": 9108, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["args"] == ["run", "--config", "/etc/embedwatch/config.yaml"]
    assert "command" not in c, "the image's ENTRYPOINT (tini -- embedwatch) must stay in charge"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "http-metrics", "port": 9108, "targetPort": "http-metrics", "protocol": "TCP"}
    ]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    cfg = yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-embedwatch")["data"]["config.yaml"])
    assert pod["terminationGracePeriodSeconds"] > cfg.get("shutdown_timeout_s", 8)


def test_grace_period_must_exceed_shutdown_timeout(tools: dict[str, Path]) -> None:
    proc = helm(tools, "template", RELEASE, str(CHART), "--set", "terminationGracePeriodSeconds=5",
                check=False)
    assert proc.returncode != 0 and "shutdown_timeout_s" in proc.stderr


@pytest.mark.parametrize("which", ["default_docs", "all_docs"])
def test_labels(request: pytest.FixtureRequest, which: str) -> None:
    docs = request.getfixturevalue(which)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "embedwatch", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "embedwatch-0.1.0"
    dep = one(docs, "Deployment")
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "embedwatch", "app.kubernetes.io/instance": RELEASE}
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert one(docs, "Service")["spec"]["selector"] == selector


def test_pod_anti_affinity_and_pdb(default_docs: list[dict[str, Any]], all_docs: list[dict[str, Any]]) -> None:
    soft = one(default_docs, "Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in soft
    hard = one(all_docs, "Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in hard
    assert one(default_docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one(all_docs, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "embedwatch", "app.kubernetes.io/instance": RELEASE}},
    }


# ------------------------------------------------------------------------------- config, secrets
@pytest.mark.parametrize("which", ["default_docs", "all_docs"])
def test_config_is_valid_service_config_without_secrets(
    request: pytest.FixtureRequest, which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedwatch.config import load_settings

    for name in list(os.environ):
        if name.startswith("EMBEDWATCH_"):
            monkeypatch.delenv(name)
    docs = request.getfixturevalue(which)
    text = one(docs, "ConfigMap", f"{RELEASE}-embedwatch")["data"]["config.yaml"]
    cfg = yaml.safe_load(text)
    assert "sasl_password" not in cfg.get("kafka", {}) and "admin_token" not in cfg.get("http", {})
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    # the Secret provides the password: emulate the env var the pod gets
    env = {e["name"] for e in container(docs).get("env", [])}
    if "EMBEDWATCH_KAFKA__SASL_PASSWORD" in env:
        monkeypatch.setenv("EMBEDWATCH_KAFKA__SASL_PASSWORD", "from-secret")
    settings = load_settings(path)
    assert settings.http.port == 9108


def test_low_memory_profile_applies_through_the_chart(
    tools: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """profiles/low-memory.yaml's detection keys, given as ``config.detection`` values (what
    docs/deploy.md tells chart users to do), pass the chart's values schema and reach the
    service's config beside the chart's own keys."""
    from embedwatch.config import load_settings

    for name in list(os.environ):
        if name.startswith("EMBEDWATCH_"):
            monkeypatch.delenv(name)
    profile = ROOT / "profiles" / "low-memory.yaml"
    detection = yaml.safe_load(profile.read_text(encoding="utf-8"))["detection"]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": {"detection": detection}}), encoding="utf-8")
    docs = docs_of(render(tools, "-f", str(values)))
    text = one(docs, "ConfigMap", f"{RELEASE}-embedwatch")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    got, want = load_settings(path), load_settings(profile)
    assert got.detection == want.detection
    assert got.kafka.bootstrap_servers == "kafka:9092" and got.state.backend == "kafka"


def _load_rendered_config(docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The rendered config.yaml and the container's literal env vars, loaded as `embedwatch run` does."""
    from embedwatch.config import load_settings

    for name in list(os.environ):
        if name.startswith("EMBEDWATCH_"):
            monkeypatch.delenv(name)
    for e in container(docs).get("env", []):
        if e["name"].startswith("EMBEDWATCH_"):
            monkeypatch.setenv(e["name"], e.get("value", "from-secret"))
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", f"{RELEASE}-embedwatch")["data"]["config.yaml"], encoding="utf-8")
    return load_settings(path)


def test_empty_queries_topic_disables_queries_through_the_chart(
        tools: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`config.kafka.queries_topic: ""` reaches the service and no topic is read as queries (a null
    would be dropped by Helm's merge of values: the service would consume `queries`)."""
    from embedwatch.app import Service

    values = tmp_path / "values.yaml"
    values.write_text('config:\n  kafka:\n    queries_topic: ""\n', encoding="utf-8")
    settings = _load_rendered_config(docs_of(render(tools, "-f", str(values))), tmp_path, monkeypatch)
    assert settings.kafka.queries_topic == "" and settings.kafka.embeddings_topic == "embeddings"
    assert Service(settings).decoder.query_topics == frozenset()
    # The chart documents the way that works.
    row = next(ln for ln in (CHART / "README.md").read_text(encoding="utf-8").splitlines()
               if ln.startswith("| `config.kafka.queries_topic`"))
    assert '`""` to disable' in row and "`null` to disable" not in row, row
    assert '"" disables them' in (CHART / "values.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_kafka_tls_with_a_protocol_without_tls_is_refused(tools: dict[str, Path], protocol: str) -> None:
    proc = helm(tools, "template", RELEASE, str(CHART), "--set", "kafkaTls.enabled=true",
                "--set", "kafkaTls.secretName=ca", "--set", f"config.kafka.security_protocol={protocol}",
                check=False)
    assert proc.returncode != 0, proc.stdout[:300]
    assert f"kafkaTls.enabled needs config.kafka.security_protocol SSL or SASL_SSL (got {protocol})" in proc.stderr


@pytest.mark.parametrize(("key", "value", "protocol"), [
    ("ssl_cafile", "/ca.crt", "PLAINTEXT"), ("ssl_check_hostname", "false", "SASL_PLAINTEXT"),
    ("sasl_username", "u", "SSL"), ("sasl_mechanism", "PLAIN", "PLAINTEXT"),
])
def test_security_keys_the_protocol_would_ignore_are_refused(
        tools: dict[str, Path], key: str, value: str, protocol: str) -> None:
    proc = helm(tools, "template", RELEASE, str(CHART), "--set", f"config.kafka.{key}={value}",
                "--set", f"config.kafka.security_protocol={protocol}", check=False)
    assert proc.returncode != 0 and f"config.kafka.{key} needs config.kafka.security_protocol" in proc.stderr


def test_kafka_tls_over_ssl_renders_a_config_the_service_loads(
        tools: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = docs_of(render(tools, "--set", "kafkaTls.enabled=true", "--set", "kafkaTls.secretName=ca",
                          "--set", "config.kafka.security_protocol=SSL"))
    settings = _load_rendered_config(docs, tmp_path, monkeypatch)
    assert settings.kafka.security_protocol == "SSL" and settings.kafka.ssl_cafile == "/etc/embedwatch/tls/ca.crt"


def test_http_port_zero_is_refused(tools: dict[str, Path]) -> None:
    """Port 0 would bind a random port while the container port and the probes say 9108."""
    proc = helm(tools, "template", RELEASE, str(CHART), "--set", "config.http.port=0", check=False)
    assert proc.returncode != 0 and "/config/http/port" in proc.stderr, proc.stdout[:300]


def test_tls_paths_and_mount(all_docs: list[dict[str, Any]]) -> None:
    cfg = yaml.safe_load(one(all_docs, "ConfigMap", f"{RELEASE}-embedwatch")["data"]["config.yaml"])
    assert cfg["kafka"]["ssl_cafile"] == "/etc/embedwatch/tls/ca.crt"
    assert cfg["kafka"]["ssl_certfile"] == "/etc/embedwatch/tls/tls.crt"
    assert cfg["kafka"]["ssl_keyfile"] == "/etc/embedwatch/tls/tls.key"
    pod = one(all_docs, "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "kafka-tls")
    assert vol["secret"]["secretName"] == "embedwatch-kafka-tls"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-tls")
    assert mount["mountPath"] == "/etc/embedwatch/tls" and mount["readOnly"] is True


def _secret_env(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(docs).get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_existing_secret_env_refs(all_docs: list[dict[str, Any]]) -> None:
    refs = _secret_env(all_docs)
    assert refs["EMBEDWATCH_KAFKA__SASL_PASSWORD"]["name"] == "embedwatch-credentials"
    assert refs["EMBEDWATCH_KAFKA__SASL_PASSWORD"]["key"] == "kafka-sasl-password"
    assert refs["EMBEDWATCH_KAFKA__SASL_PASSWORD"]["optional"] is False  # SASL_SSL needs it
    assert refs["EMBEDWATCH_HTTP__ADMIN_TOKEN"] == {
        "name": "embedwatch-credentials", "key": "admin-token", "optional": True,
    }
    assert not [d for d in all_docs if d["kind"] == "Secret"], "existingSecret: the chart creates none"


def test_chart_created_secret(tools: dict[str, Path]) -> None:
    docs = docs_of(render(tools, "--set", "secrets.kafkaSaslPassword=s3cret",
                          "--set", "secrets.adminToken=t0ken", "--set", "config.kafka.security_protocol=SASL_PLAINTEXT",
                          "--set", "config.kafka.sasl_mechanism=PLAIN", "--set", "config.kafka.sasl_username=u"))
    secret = one(docs, "Secret")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "kafka-sasl-password": "s3cret", "admin-token": "t0ken",
    }
    refs = _secret_env(docs)
    assert refs["EMBEDWATCH_KAFKA__SASL_PASSWORD"] == {
        "name": f"{RELEASE}-embedwatch", "key": "kafka-sasl-password", "optional": False,
    }
    assert refs["EMBEDWATCH_HTTP__ADMIN_TOKEN"]["name"] == f"{RELEASE}-embedwatch"
    for doc in docs:
        if doc["kind"] != "Secret":
            assert "s3cret" not in json.dumps(doc) and "t0ken" not in json.dumps(doc), doc["kind"]


def test_sasl_password_reaches_the_pod_only_over_sasl(tmp_path: Path, tools: dict[str, Path]) -> None:
    """The service refuses a SASL password its protocol would not use: an existing Secret's
    password is not injected under PLAINTEXT / SSL, and a chart-held one is refused."""
    for protocol in ("PLAINTEXT", "SSL"):
        docs = docs_of(render(tools, "--set", "secrets.existingSecret=creds",
                              "--set", f"config.kafka.security_protocol={protocol}"))
        assert set(_secret_env(docs)) == {"EMBEDWATCH_HTTP__ADMIN_TOKEN"}, protocol
    proc = helm(tools, "template", RELEASE, str(CHART), "--set", "secrets.kafkaSaslPassword=s3cret", check=False)
    assert proc.returncode != 0 and "secrets.kafkaSaslPassword needs config.kafka.security_protocol" in proc.stderr
    assert "s3cret" not in proc.stderr


def test_no_secret_no_env(default_docs: list[dict[str, Any]]) -> None:
    assert _secret_env(default_docs) == {}
    assert not [d for d in default_docs if d["kind"] == "Secret"]


def test_secrets_in_config_are_refused(tools: dict[str, Path]) -> None:
    proc = helm(tools, "template", RELEASE, str(CHART), "--set", "config.http.admin_token=x", check=False)
    assert proc.returncode != 0  # rejected by values.schema.json (and by the template)


def test_values_schema_rejects_unknown_and_bad_values(tools: dict[str, Path]) -> None:
    for bad in ("image.pullPolicy=Sometimes", "config.kafka.bootstrap_server=x", "replicaCount=-1",
                "podAntiAffinity=maybe", "config.state.backend=s3", "unknownTopLevel=1"):
        proc = helm(tools, "template", RELEASE, str(CHART), "--set", bad, check=False)
        assert proc.returncode != 0, f"--set {bad} was accepted"


def test_config_checksum_rolls_pods(tools: dict[str, Path], default_docs: list[dict[str, Any]]) -> None:
    def checksum(docs: list[dict[str, Any]]) -> str:
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    changed = docs_of(render(tools, "--set", "config.detection.reference_size=3000"))
    assert re.fullmatch(r"[0-9a-f]{64}", checksum(default_docs))
    assert checksum(changed) != checksum(default_docs)


def test_keda_scaled_object(all_docs: list[dict[str, Any]]) -> None:
    so = one(all_docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-embedwatch"
    trig = so["spec"]["triggers"][0]
    assert trig["type"] == "kafka"
    assert trig["metadata"]["bootstrapServers"] == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert trig["metadata"]["consumerGroup"] == "embedwatch-prod"
    assert trig["metadata"]["topic"] == "embeddings"
    assert trig["metadata"]["lagThreshold"] == "2000"
    assert "replicas" not in one(all_docs, "Deployment")["spec"], "KEDA owns the replica count"


def test_network_policy(all_docs: list[dict[str, Any]]) -> None:
    np = one(all_docs, "NetworkPolicy")["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"]
    ingress = np["ingress"][0]
    assert ingress["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    egress_ports = [p["port"] for rule in np["egress"] for p in rule.get("ports", [])]
    assert 9092 in egress_ports and 9093 in egress_ports and 53 in egress_ports


# ------------------------------------------------------------------ monitoring: one source of truth
def test_chart_copies_are_byte_identical_to_sources() -> None:
    assert RULES_FILE.exists(), f"{RULES_FILE} missing"
    assert (CHART / "files/alerts/embedwatch-rules.yml").read_bytes() == RULES_FILE.read_bytes(), (
        "helm/embedwatch/files/alerts/embedwatch-rules.yml is stale: run scripts/sync-chart"
    )
    sources = {p.name: p.read_bytes() for p in DASHBOARDS_DIR.glob("*.json")}
    copies = {p.name: p.read_bytes() for p in (CHART / "files/dashboards").glob("*.json")}
    assert sources, "no dashboards/*.json"
    assert copies.keys() == sources.keys(), "dashboard copies differ from dashboards/: run scripts/sync-chart"
    for name in sources:
        assert copies[name] == sources[name], f"files/dashboards/{name} is stale: run scripts/sync-chart"


def test_sync_chart_check_is_clean() -> None:
    """Copies, and values.schema.json's `config` block generated from config.py, are current."""
    proc = subprocess.run([str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists()
                           else "python3", str(ROOT / "scripts" / "sync-chart"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_prometheus_rule_equals_rules_file(all_docs: list[dict[str, Any]]) -> None:
    rule = one(all_docs, "PrometheusRule")
    source = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["spec"] == {"groups": source["groups"]}
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["namespace"] == "monitoring"


def test_service_monitor(all_docs: list[dict[str, Any]]) -> None:
    sm = one(all_docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["selector"]["matchLabels"] == one(all_docs, "Service")["spec"]["selector"]


def test_dashboards_configmaps(all_docs: list[dict[str, Any]], tools: dict[str, Path]) -> None:
    cms = [d for d in all_docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    sources = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARDS_DIR.glob("*.json")}
    assert len(cms) == len(sources) > 0
    rendered = {}
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "embedwatch"
        assert cm["metadata"]["namespace"] == "monitoring"
        rendered.update(cm["data"])
    assert rendered.keys() == sources.keys()
    for name, text in sources.items():
        # byte-for-byte (modulo the block scalar's final newline): ${...} and {{...}} untouched
        assert rendered[name] == text.rstrip("\n"), name
        json.loads(rendered[name])
    # the sidecar label is configurable
    docs = docs_of(render(tools, "--set", "dashboards.enabled=true", "--set", "dashboards.label=my_dash",
                          "--set", "dashboards.labelValue=yes"))
    labelled = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("my_dash") == "yes"]
    assert len(labelled) == len(sources)


# ----------------------------------------------------------------------------------- docs, schema
def _leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix


def test_readme_lists_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    missing = [k for k in _leaf_keys(values) if f"`{k}`" not in readme]
    assert not missing, f"chart README.md does not document: {missing}"


def _merge(base: Any, overlay: Any) -> Any:
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {k: _merge(base.get(k), overlay[k]) if k in overlay else base[k] for k in {*base, *overlay}}
    return overlay


def test_values_schema_is_draft7_and_covers_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema).validate(values)
    overlay = yaml.safe_load(ALL_FEATURES.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema).validate(_merge(values, overlay))
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2" and chart["name"] == "embedwatch"
    assert chart["appVersion"] == "0.1.0"
    assert (CHART / "templates" / "NOTES.txt").exists()


@pytest.mark.parametrize(("sets", "words"), [
    # Rendered and valid, but every checkpoint failed on the read-only root: the pod never ready.
    (["config.state.backend=file"], "needs persistence.enabled"),
    # Pods on other nodes cannot attach one ReadWriteOnce volume.
    (["config.state.backend=file", "persistence.enabled=true", "replicaCount=3"], "3 replicas cannot share"),
    (["config.state.backend=file", "persistence.enabled=true", "keda.enabled=true"], "6 replicas cannot share"),
    # No replica: no StreamSilent, and EmbedwatchDown (critical) at every scale to zero.
    (["keda.enabled=true", "keda.minReplicaCount=0"], "minReplicaCount"),
])
def test_state_and_scaling_values_that_cannot_work_are_refused(
        tools: dict[str, Path], sets: list[str], words: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    proc = helm(tools, "template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr


def test_one_replica_on_a_volume_and_several_on_a_shared_one_render(tools: dict[str, Path]) -> None:
    one_replica = docs_of(render(tools, "--set", "config.state.backend=file", "--set", "persistence.enabled=true"))
    assert one(one_replica, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    shared = docs_of(render(tools, "--set", "config.state.backend=file", "--set", "persistence.enabled=true",
                            "--set", "replicaCount=3", "--set", "persistence.accessModes={ReadWriteMany}"))
    assert one(shared, "Deployment")["spec"]["replicas"] == 3
