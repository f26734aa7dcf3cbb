"""Service configuration: one pydantic model, read from a YAML file and ``EMBEDWATCH_*`` env vars.

Precedence, highest first: environment variables, the YAML file, the defaults below. Nested
keys use ``__`` in env vars: ``EMBEDWATCH_KAFKA__BOOTSTRAP_SERVERS=broker:9092``. An unknown key
or a bad value is a startup error that names the key (:class:`ConfigError`).

docs/configuration.md is generated from this module (``embedwatch config docs``) and a test
checks that the committed file matches, so the reference cannot go stale.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "EMBEDWATCH_"


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class KafkaSettings(_Section):
    """Where events come from and where rejected ones go."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    group_id: str = Field("embedwatch", min_length=1, description="Consumer group; replicas share it.")
    client_id: str = Field("embedwatch", min_length=1, description="Client id sent to the broker.")
    embeddings_topic: str = Field("embeddings", min_length=1, description="Topic of embedding events.")
    queries_topic: str | None = Field(
        "queries",
        description='Topic of query events; "" to disable (Helm values and env vars cannot carry null). '
        "Must differ from embeddings_topic.",
    )
    dlq_suffix: str = Field(
        ".dlq", min_length=1, description="Dead-letter topic of a topic is `<topic><dlq_suffix>`."
    )
    backend: Literal["kafka-python", "confluent"] = Field(
        "kafka-python",
        description="Client library: `kafka-python` (pure Python, always installed), or `confluent` "
        "(the confluent-kafka package, librdkafka; about twice the throughput, see docs/benchmarks.md; needs "
        "the `confluent` extra, which the container image includes and the Helm chart selects).",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts."
    )
    max_poll_records: int = Field(
        2000, ge=1, le=100_000,
        description="Upper bound of one poll batch (raised after a batch of many streams: poll_events_per_stream). "
        "A larger bound can speed up catching up on a backlog (each batch has a fixed cost: each stream's update "
        "and confirming a commit; docs/benchmarks.md measures it: with 3 streams, 10000 gave JSON 47-50k against "
        "30-44k events/s end to end, b64 63-72k against 55-69k, within this machine's run-to-run spread) at the "
        "memory of a larger batch (30-120 MiB more at 384-d).",
    )
    poll_events_per_stream: int = Field(
        100, ge=0, le=100_000,
        description="When a poll batch spread over many streams, the next poll asks for up to this many events per "
        "stream of that batch, if that is more than max_poll_records (within max_poll_bytes and 100000 "
        "records). Each stream's update has a fixed cost, so a batch of a few events per stream is mostly "
        "overhead: a b64 backlog of 100 streams was consumed at 28-40k against 19-30k events/s, 1.38x on average "
        "(docs/benchmarks.md). Only a service that is behind fills such batches; otherwise the confluent client "
        "waits up to poll_timeout_ms for a batch it cannot fill, where a smaller one might have returned sooner "
        "(events then reach the metrics up to that much later). 0: always max_poll_records.",
    )
    max_poll_bytes: int = Field(
        16 << 20, ge=1 << 20, le=1 << 30,
        description="Bound of a batch raised by poll_events_per_stream, in message bytes (the previous batch's "
        "mean message size times the records asked); it never holds the bound below max_poll_records. A batch "
        "is held in memory while it is processed, about twice its message bytes once decoded.",
    )
    poll_timeout_ms: int = Field(200, ge=1, le=60_000, description="How long one poll waits for data.")
    session_timeout_ms: int = Field(
        30_000, ge=1000, le=300_000,
        description="Group session timeout: long enough to ride out CPU stalls on a busy node. Must lie within "
        "the broker's group.min.session.timeout.ms (6000 by default) and group.max.session.timeout.ms "
        "(1800000): a broker refuses a join outside them, and the consumer then never gets a partition.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user (security_protocol SASL_* only).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (security_protocol SASL_* only; never logged or exported)."
    )
    ssl_cafile: str | None = Field(
        None, description="CA bundle (PEM) to verify the broker (security_protocol SSL or SASL_SSL only)."
    )
    ssl_certfile: str | None = Field(
        None, description="Client certificate (PEM) for mutual TLS (security_protocol SSL or SASL_SSL only)."
    )
    ssl_keyfile: str | None = Field(
        None, description="Client key (PEM) for mutual TLS (security_protocol SSL or SASL_SSL only)."
    )
    ssl_check_hostname: bool = Field(
        True, description="Verify the broker's hostname against its cert (security_protocol SSL or SASL_SSL only)."
    )

    @model_validator(mode="after")
    def _distinct_topics(self) -> KafkaSettings:
        # A shared topic would make every embedding event a query event: no baseline, no drift test.
        if self.queries_topic == self.embeddings_topic:
            raise ValueError(f"queries_topic must differ from embeddings_topic ({self.embeddings_topic!r}); "
                             '"" disables queries')
        return self

    @model_validator(mode="after")
    def _security_keys_match_protocol(self) -> KafkaSettings:
        # The clients read ssl_* only over *SSL and sasl_* only over SASL_*: a key set for another
        # protocol would be dropped without a word (e.g. a CA for a connection that stays plaintext).
        ssl = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, n) is not None]
        if "ssl_check_hostname" in self.model_fields_set:
            ssl.append("ssl_check_hostname")
        if ssl and not self.security_protocol.endswith("SSL"):
            raise ValueError(f"{', '.join(ssl)} set, but security_protocol {self.security_protocol} does not "
                             "use TLS: set security_protocol SSL or SASL_SSL, or remove them")
        sasl = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, n) is not None]
        if sasl and not self.security_protocol.startswith("SASL"):
            raise ValueError(f"{', '.join(sasl)} set, but security_protocol {self.security_protocol} does not "
                             "use SASL: set security_protocol SASL_PLAINTEXT or SASL_SSL, or remove them")
        return self

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and (
            self.sasl_mechanism is None or self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError("SASL_* security_protocol needs sasl_mechanism, sasl_username, sasl_password")
        return self

    @model_validator(mode="after")
    def _backend_installed(self) -> KafkaSettings:
        # Caught by `config check` and at start-up, not as an ImportError once the service runs.
        if self.backend == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
            raise ValueError("backend 'confluent' needs the confluent-kafka package: "
                             "pip install 'embedwatch[confluent]'")
        return self

    def dlq_topic(self, topic: str) -> str:
        return f"{topic}{self.dlq_suffix}"


class LimitSettings(_Section):
    """Bounds that keep memory and Prometheus cardinality fixed whatever producers send."""

    max_streams: int = Field(200, ge=1, le=100_000, description="Live streams; beyond: dead-lettered.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Larger messages are dead-lettered unparsed."
    )
    max_dim: int = Field(8192, ge=1, le=1_000_000, description="Larger vectors are dead-lettered.")
    max_events_per_message: int = Field(10_000, ge=1, description="Longest JSON array accepted.")
    max_label_length: int = Field(128, ge=1, le=1024, description="Longest model/version/segment.")
    max_future_skew_s: float = Field(
        300.0, ge=0,
        description="Events whose time is more than this many seconds after this service's clock are "
        "dead-lettered (schema): a window keeps its newest time as a running max, so one event from a "
        "clock far ahead (or in milliseconds sent as seconds) would evict every later, correct event.",
    )
    heap_trim_interval_s: float = Field(
        60.0, ge=0,
        description="Seconds between collections of garbage cycles and returns of freed heap memory to the OS "
        "(glibc malloc_trim, a few ms); without the trims a 768-d stream at steady state held 1.1 MiB more, "
        "without the collections a soak's RSS rose 25-60 MB between the collector's own. 0: never.",
    )
    stream_idle_s: float = Field(
        7 * 86400.0, ge=0,
        description="A stream with no event for this many seconds is forgotten: no event newer than that (event "
        "time, against this service's clock) and none received in that time (a backlog of old events being "
        "caught up keeps its stream, and so does unread data in its partition; at a restore, idleness is judged "
        "when the checkpoint was written). Its max_streams slot, its series and its checkpoint entry are freed, so a "
        "restart does not bring it back; its stored baselines stay, and if it comes back it starts from its "
        "active one. Checked every minute. Model versions retired over months would otherwise hold slots for "
        "ever. 0: keep every stream.",
    )
    forget_idle_baselines: bool = Field(
        False,
        description="Also remove the stored baselines of a stream forgotten as idle (limits.stream_idle_s), its query "
        "embeddings' included, as POST /api/baselines/<stream>/forget does: with durable state every replica holds "
        "every stored version of every stream ever seen (0.4 MiB a 768-d version), so deployments whose model "
        "versions come and go grow by each retired one. A stream that comes back after that builds a new baseline "
        "from its next events instead of starting from its stored one (in every deployment sharing state.topic).",
    )


class DetectionSettings(_Section):
    """What a stream is compared against and when it counts as drifting."""

    reference_size: int = Field(
        1000, ge=50, le=1_000_000, description="Events of a new stream that form its first baseline."
    )
    window_events: int = Field(1000, ge=50, description="Count bound of the rolling window.")
    window_seconds: float = Field(3600.0, gt=0, description="Time bound of the rolling window.")
    buckets: int = Field(
        10, ge=2, le=1000, description="Buckets in the window ring (window_events must be a multiple of it)."
    )
    reservoir_per_bucket: int = Field(
        64, ge=4, le=100_000, description="Vectors sampled per bucket for the MMD test (held until their "
        "random-feature sum is computed, then dropped)."
    )
    baseline_sample: int = Field(1000, ge=50, description="Reference vectors kept in a baseline.")
    evaluate_every: int = Field(100, ge=1, description="Evaluate detectors every N events of a stream.")
    false_alarm_rate: float = Field(
        1e-6, gt=0, lt=0.5,
        description="Level of each evaluation of the calibrated tests, split evenly: half to the MMD test at "
        "each evaluation (every evaluate_every events), half across the scan windows at each scan point (every "
        "scan_every events); without scan windows the MMD test has all of it. Per event, false alarms of a "
        "stream in distribution are at most false_alarm_rate x (1/evaluate_every + 1/scan_every) / 2 (3e-8 at "
        "the defaults).",
    )
    effect_size_floor: float = Field(
        0.002, ge=0,
        description="Minimum effect size (debiased MMD^2, Gaussian kernel) before a rejection counts "
        "as drift. 0.002 is about twice the largest in-distribution score seen over 1e5 events of real "
        "text-embedding streams with a 1000-event window and baseline.",
    )
    scan_every: int = Field(
        20, ge=1, description="Run the recent-window mean-shift test every N events of a stream (vectorised, "
        "O(d) per event: it keeps one running sum per scan_every events)."
    )
    scan_windows: list[int] = Field(
        [100, 200, 500, 1000],
        description="Sizes (events, multiples of scan_every) of the recent windows whose mean is tested "
        "against the baseline mean at every scan. Small windows catch an abrupt change within tens of "
        "events, large ones a partial or slow one. Empty: no scan (MMD test only).",
    )
    scan_components: int = Field(
        64, ge=1, le=4096, description="Principal directions of the baseline kept by the mean-shift whitening."
    )
    scan_shrinkage: float = Field(
        1.0, gt=0, le=1000,
        description="Variance added to every direction of the mean-shift whitening, in units of the mean "
        "eigenvalue of the baseline covariance (larger: closer to the plain centroid distance).",
    )
    scan_effect_floor: float = Field(
        0.1, ge=0,
        description="Minimum effect size of the mean-shift test (debiased squared whitened distance of "
        "the window mean to the baseline mean) before a rejection counts as drift.",
    )
    rff_features: int = Field(256, ge=16, le=8192, description="Random Fourier features of the MMD test.")
    histogram_bins: int = Field(64, ge=8, le=1024, description="Bins of similarity/norm histograms.")
    dimension_alpha: float = Field(0.01, gt=0, lt=1, description="FDR level for the per-dimension test.")
    no_match_threshold: float = Field(
        0.3, description="A query whose top-1 score is below this counts as no-match."
    )
    precision_k: int = Field(10, ge=1, le=1000, description="k of precision@k and recall@k.")
    version_probe_size: int = Field(
        2000, ge=10, le=100_000, description="Shared ids kept per model for version comparison."
    )
    version_solo_probe_size: int = Field(
        64, ge=1, le=100_000,
        description="Recent ids kept per model while it has a single version: the new version's first items "
        "pair only with old-version twins this recent (all later pairs within version_probe_size ids are caught).",
    )
    version_knn_k: int = Field(10, ge=1, le=100, description="k of the k-NN overlap between versions.")
    duplicate_window: int = Field(
        100_000, ge=100, description="Ids remembered per stream for duplicate detection (at least this many, "
        "at most a quarter more: the memory drops its oldest quarter at a time; 5 bytes per id; an id falsely "
        "matches with probability ids held / 2**32)."
    )
    seed: int = Field(0, description="Seed of every random choice (reservoirs, features), for repeatability.")
    min_window_events: int = Field(
        100, ge=10, description="Window events needed before the multivariate drift test runs (at most "
        "window_events - window_events / buckets + 1: what a full window holds once its oldest bucket is "
        "dropped for a new one; more and the test runs only when a bucket boundary falls on an evaluation, "
        "and may never run)."
    )
    max_evaluations_per_update: int = Field(
        4, ge=1, le=100_000,
        description="Cap on detector evaluations within one update call (one poll batch of a stream). "
        "When more are due (a batch longer than evaluate_every), evenly spaced due points are "
        "evaluated, always including the last one; the others are skipped. Bounds detection cost.",
    )
    @model_validator(mode="after")
    def _check_scan(self) -> DetectionSettings:
        bad = [w for w in self.scan_windows if w < self.scan_every or w % self.scan_every]
        if bad:
            raise ValueError(f"scan_windows {bad}: each must be a positive multiple of scan_every "
                             f"({self.scan_every})")
        if len(set(self.scan_windows)) != len(self.scan_windows):
            raise ValueError("scan_windows must not repeat a size")
        if self.scan_windows and self.evaluate_every * self.alarm_end_evaluations < self.scan_every:
            # An alarm ends after alarm_end_evaluations quiet evaluations; fewer events than
            # scan_every between them and no scan point falls inside, so a loud scan cannot hold
            # the alarm and it ends and starts again (flaps).
            raise ValueError(f"evaluate_every * alarm_end_evaluations ({self.evaluate_every} * "
                             f"{self.alarm_end_evaluations}) must be at least scan_every ({self.scan_every})")
        return self

    @model_validator(mode="after")
    def _check_window(self) -> DetectionSettings:
        if self.window_events % self.buckets:
            # Equal buckets make the count bound exact: a window holds between window_events -
            # window_events / buckets + 1 and window_events events.
            raise ValueError(f"window_events ({self.window_events}) must be a multiple of buckets "
                             f"({self.buckets})")
        # A full window drops its oldest bucket when it opens a new one: right after, it holds
        # window_events - window_events / buckets + 1 events, and evaluations may always fall
        # there (the phase of evaluate_every against the buckets shifts with reference_size,
        # time-bounded buckets and restarts). Requiring more would stop the test for good.
        fewest = self.window_events - self.window_events // self.buckets + 1
        if self.min_window_events > fewest:
            raise ValueError(f"min_window_events ({self.min_window_events}) must be at most window_events "
                             f"({self.window_events}) - window_events / buckets ({self.buckets}) + 1 = "
                             f"{fewest}, the fewest events a full window holds: above it the multivariate "
                             "test runs only when a bucket boundary happens to fall on an evaluation, and "
                             "may never run")
        return self

    alarm_end_evaluations: int = Field(
        2, ge=1, le=1000,
        description="Consecutive evaluations with p > 100 * false_alarm_rate or score below the floor "
        "that end an alarm (hysteresis against flapping). With the scan on, evaluate_every * "
        "alarm_end_evaluations must be at least scan_every, so a scan point falls within them.",
    )
    changepoint_threshold: float = Field(
        50.0, gt=0, description="Page-Hinkley threshold, in baseline standard deviations of the score."
    )
    changepoint_delta: float = Field(
        0.5, ge=0, description="Page-Hinkley tolerated change, in baseline standard deviations."
    )
    changepoint_min_instances: int = Field(
        30, ge=1, description="Events since the last change point before a new one can be signalled."
    )
    changepoint_alpha: float = Field(
        1.0, gt=0, le=1,
        description="Forgetting factor of the Page-Hinkley cumulative sums (1: none; below 1 the faded "
        "sums fluctuate by ~1/sqrt(1 - alpha^2) and long streams raise false change points).",
    )


class HttpSettings(_Section):
    """The one HTTP port: /metrics, /healthz, /readyz, /api/*."""

    host: str = Field("0.0.0.0", description="Listen address.")
    port: int = Field(9108, ge=1, le=65535, description="Listen port.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for mutations (POST /api/baselines/*); none or blank: mutations "
        "refused. Surrounding whitespace (a Secret file's newline) is dropped."
    )

    @field_validator("admin_token")
    @classmethod
    def _strip_token(cls, v: SecretStr | None) -> SecretStr | None:
        # A header cannot carry surrounding whitespace; a blank token (a Secret holding only a
        # newline) would otherwise authorise `Authorization: Bearer ` with nothing after it.
        if v is None:
            return None
        token = v.get_secret_value().strip()
        return SecretStr(token) if token else None


class StateSettings(_Section):
    """Where baselines and window checkpoints live across restarts."""

    backend: Literal["none", "kafka", "file"] = Field(
        "kafka", description="kafka: compacted topic; file: a directory (e.g. a PVC); none: in memory."
    )
    topic: str = Field(
        "embedwatch-state", min_length=1,
        description="Compacted state topic. Checkpoints are kept per consumer group, baselines per stream: "
        "deployments that share the topic share their streams' baselines (a promotion, rollback or forget in one "
        "is one in the others), so give each deployment its own.")
    directory: str = Field("/var/lib/embedwatch", description="Directory of the file backend.")
    checkpoint_interval_s: float = Field(30.0, gt=0, description="Seconds between checkpoints.")


class Settings(BaseSettings):
    """All of embedwatch's settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)  # type: ignore[arg-type]
    limits: LimitSettings = Field(default_factory=LimitSettings)  # type: ignore[arg-type]
    detection: DetectionSettings = Field(default_factory=DetectionSettings)  # type: ignore[arg-type]
    http: HttpSettings = Field(default_factory=HttpSettings)  # type: ignore[arg-type]
    state: StateSettings = Field(default_factory=StateSettings)  # type: ignore[arg-type]
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    blas_threads: int = Field(
        1, ge=1, le=256, description="BLAS threads per process; 1 is fastest for embedwatch's small products."
    )
    shutdown_timeout_s: float = Field(
        8.0, gt=0, le=300,
        description="Budget, from SIGTERM, to finish the batch, checkpoint, commit and leave the group. At most "
        "three quarters of it go to the final checkpoint and commit, the rest to leaving the group; a step that "
        "does not fit is abandoned with a WARNING, and what was not committed is processed again by the "
        "partitions' next owner (at-least-once). terminationGracePeriodSeconds must exceed it.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; env vars must win over it, so env comes first.
        return (env_settings, init_settings, file_secret_settings)


def _secret_keys() -> frozenset[str]:
    """Names of the SecretStr settings (sasl_password, admin_token, ...)."""
    names: set[str] = set()
    for field in Settings.model_fields.values():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names.update(n for n, f in sub.model_fields.items() if "SecretStr" in str(f.annotation))
    return frozenset(names)


def _redact(value: Any, key: str | None, secrets: frozenset[str]) -> Any:
    """``value`` with every secret masked: an error about a section echoes the whole section."""
    if key in secrets and value is not None:
        return "**********"
    if isinstance(value, dict):
        return {k: _redact(v, str(k), secrets) for k, v in value.items()}
    return value


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    secrets = _secret_keys()
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = _redact(e.get("input"), str(e["loc"][-1]) if e["loc"] else None, secrets)
        lines.append(f"  {key}: {msg} (got {got!r})" if e["type"] != "extra_forbidden"
                     else f"  {key}: {msg}")
    return "\n".join(lines)


# Variables of embedwatch's own scripts, tests and benchmarks (scripts/kafka-local, scripts/demo,
# tests/conftest.py, ...), not settings: an operator who exported one for a script must still be
# able to start the service from the same shell.
TOOLING_ENV = frozenset({
    "EMBEDWATCH_CACHE_DIR", "EMBEDWATCH_PYTHON", "EMBEDWATCH_DEMO_PORT", "EMBEDWATCH_DEMO_RATE",
    "EMBEDWATCH_DEMO_START_TIMEOUT", "EMBEDWATCH_KAFKA_HEAP_OPTS", "EMBEDWATCH_KAFKA_LOG_LEVEL",
    "EMBEDWATCH_KAFKA_START_TIMEOUT", "EMBEDWATCH_KAFKA_IMAGE", "EMBEDWATCH_KAFKA_SASL_SSL_DIR",
    "EMBEDWATCH_KAFKA_SSL_STORE_PASSWORD", "EMBEDWATCH_KAFKA_SSL_CLIENT_AUTH", "EMBEDWATCH_TEST_KAFKA",
    "EMBEDWATCH_REAL_EMBEDDINGS",
})


def _check_env_keys() -> None:
    """Unknown ``EMBEDWATCH_*`` variables are errors too: a typo must not be silently ignored."""
    known = set(Settings.model_fields)
    for name in os.environ:
        if not name.startswith(ENV_PREFIX) or name in TOOLING_ENV:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if parts[0] not in known:
            raise ConfigError(f"invalid configuration (environment): {name}: unknown key")
        field = Settings.model_fields[parts[0]]
        sub = field.annotation
        if len(parts) == 1:
            continue
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            # pydantic-settings drops a nested key under a scalar without a word.
            raise ConfigError(f"invalid configuration (environment): {name}: unknown key "
                              f"{'.'.join(parts)} ({parts[0]} is not a section)")
        if parts[1] not in sub.model_fields:
            raise ConfigError(
                    f"invalid configuration (environment): {name}: unknown key {parts[0]}.{parts[1]}"
                )
        if len(parts) > 2:  # a section's keys are all scalars or lists
            raise ConfigError(f"invalid configuration (environment): {name}: unknown key "
                              f"{'.'.join(parts)} ({parts[0]}.{parts[1]} is not a section)")


def _env_parse_error(err: ValueError) -> str:
    """The message of a variable pydantic-settings could not parse (a list or a section given as
    bad JSON): it names the field only, so name the variables that set it (their values may be
    secrets: not echoed)."""
    import re

    m = re.search(r'field "([^"]+)"', str(err))
    field = m.group(1).upper() if m else ""
    own = f"{ENV_PREFIX}{field}"
    names = sorted(n for n in os.environ if field and (n.upper() == own or n.upper().startswith(own + "__")))
    which = ", ".join(names) or (own if field else "an EMBEDWATCH_* variable")
    cause = f": {err.__cause__}" if err.__cause__ is not None else ""
    return f"invalid configuration (environment): {which}: cannot parse the value (lists and sections are JSON){cause}"


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings from ``path`` (YAML) and the environment; raise :class:`ConfigError` on any problem."""
    from pydantic_settings.exceptions import SettingsError

    data: dict[str, Any] = {}
    origin = "defaults + environment"
    if path is not None:
        origin = f"{path} + environment"
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = raw
    data.update(overrides)
    _check_env_keys()
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin)) from e
    except SettingsError as e:  # an EMBEDWATCH_* value that is not even parseable (bad JSON)
        raise ConfigError(_env_parse_error(e)) from e


def settings_reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the model."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `service/embedwatch/config.py` by `embedwatch config docs`; a test keeps it",
        "identical to the model. Set a key in the YAML file given to `embedwatch run --config FILE`,",
        "or as an environment variable: `EMBEDWATCH_<SECTION>__<KEY>` (e.g.",
        "`EMBEDWATCH_KAFKA__BOOTSTRAP_SERVERS`). Environment variables win over the file. An unknown",
        "key or a bad value stops the service at startup with a message naming the key; the variables",
        "of embedwatch's own scripts (" + ", ".join(f"`{n}`" for n in sorted(TOOLING_ENV)) + ")",
        "are not settings and are left alone.",
        "",
    ]
    top_scalars = []
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [f"## `{name}`", "", (ann.__doc__ or "").strip(), ""]
            out += ["| key | env | default | description |", "|---|---|---|---|"]
            for sub, sf in ann.model_fields.items():
                default = sf.get_default(call_default_factory=True)
                out.append(
                    f"| `{name}.{sub}` | `{ENV_PREFIX}{name.upper()}__{sub.upper()}` | "
                    f"`{default!r}` | {sf.description or ''} |"
                )
            out.append("")
        else:
            top_scalars.append((name, field))
    out += ["## Top level", "", "| key | env | default | description |", "|---|---|---|---|"]
    for name, field in top_scalars:
        out.append(
            f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | `{field.get_default()!r}` | {field.description} |"
        )
    out.append("")
    return "\n".join(out)
