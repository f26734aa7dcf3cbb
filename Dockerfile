# syntax=docker/dockerfile:1
#
# embedwatch container image.
#
#   docker build -t embedwatch:0.1.0 .
#   docker run --rm -p 9108:9108 -v $PWD/config.yaml:/etc/embedwatch/config.yaml:ro --read-only embedwatch:0.1.0
#
# Two stages: `build` compiles the project (its C extension) and turns it and every runtime
# dependency into wheels; the runtime stage installs only those wheels (no compiler, no build tools,
# no torch) and runs as uid 10001 under tini. Nothing secret is baked in: the Kafka SASL password
# and the admin token arrive as env vars (EMBEDWATCH_KAFKA__SASL_PASSWORD,
# EMBEDWATCH_HTTP__ADMIN_TOKEN) at run time. The process writes
# only to /tmp (HOME) and, with state.backend=file, to /var/lib/embedwatch (mount a volume there),
# so the image runs with a read-only root filesystem.
#
# tests/unit/test_dockerfile.py lints this file with hadolint and replays its `pip wheel` /
# `pip install` steps in a fresh venv; keep those two RUN lines simple.

# ---------------------------------------------------------------------------------------------
FROM python:3.11.17-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C compiler for embedwatch's two C extensions (the decoder's b64 pass, the statistics' row
# sums; setup.py); the runtime stage installs the built wheels only. gcc is pinned; libc6-dev must
# be the version of the base image's own libc6, which the pinned base already fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY service ./service

# The project wheel plus a wheel of every runtime dependency (all ship manylinux wheels), with the
# confluent extra: the Helm chart runs the librdkafka backend, twice kafka-python's throughput.
RUN pip wheel ".[confluent]" -w /wheels

# ---------------------------------------------------------------------------------------------
FROM python:3.11.17-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="embedwatch" \
      org.opencontainers.image.description="Always-on drift, data-quality and latency monitor for production embedding streams" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="embedwatch" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.17-slim-bookworm"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp \
    TMPDIR=/tmp

# tini as PID 1: forwards SIGTERM to embedwatch (which then finishes its batch, checkpoints, commits
# and leaves the consumer group) and reaps zombies. An unprivileged user with a fixed numeric uid/gid
# (Kubernetes' runAsNonRoot can only verify a numeric USER). /etc/embedwatch/config.yaml is an empty
# mapping (all defaults + EMBEDWATCH_* env vars) until a ConfigMap is mounted over it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 embedwatch \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
               --shell /usr/sbin/nologin embedwatch \
    && mkdir -p /etc/embedwatch /var/lib/embedwatch \
    && printf '# embedwatch configuration: mount yours here (see docs/configuration.md)\n{}\n' \
       > /etc/embedwatch/config.yaml \
    && chown 10001:10001 /var/lib/embedwatch

# Install only the wheels built above (bind-mounted, so they do not stay in a layer); --no-index
# guarantees nothing is fetched or compiled here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "embedwatch[confluent]==${VERSION}"

USER 10001:10001
WORKDIR /tmp
EXPOSE 9108
STOPSIGNAL SIGTERM

# The port is read as the service reads it (the mounted config file, then EMBEDWATCH_* env vars),
# so a configured http.port is probed too. Not an ENV default: an EMBEDWATCH_HTTP__PORT in the image
# would override the config file's port.
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; from embedwatch.config import load_settings; path = '/etc/embedwatch/config.yaml'; port = load_settings(path if os.path.exists(path) else None).http.port; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["/usr/bin/tini", "--", "embedwatch"]
CMD ["run", "--config", "/etc/embedwatch/config.yaml"]
