# embedwatch: the two commands that matter are `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH):/usr/local/go/bin

.PHONY: help deps venv test test-unit test-integration lint demo bench bench-quality soak docs clean

help:
	@echo "make demo   - local broker + producer with a scheduled drift + service + live view"
	@echo "make test   - every test (installs what it needs first)"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - throughput/memory benchmarks -> benchmarks/results.json, docs/benchmarks.md"
	@echo "make bench-quality - detection quality on real embeddings vs other detectors"

deps:
	@scripts/bootstrap all

venv:
	@scripts/bootstrap python

test: deps
	$(PY) -m pytest -q tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: deps
	$(PY) -m pytest -q tests/integration tests/e2e

lint: venv
	$(VENV)/bin/ruff check service tests $(wildcard benchmarks alerts dashboards)
	$(VENV)/bin/mypy

# The demo needs only the venv and the Kafka broker, not the test tools (helm, kubeconform, ...).
demo:
	@scripts/bootstrap demo
	@# Ctrl-C (130) or SIGTERM (143) is how a demo ends: not an error of make.
	@scripts/demo; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 130 ] || [ $$rc -eq 143 ] || exit $$rc

bench: deps
	$(PY) benchmarks/run.py

bench-quality: venv
	$(PY) benchmarks/quality.py

soak: deps
	$(PY) benchmarks/soak.py

docs: venv
	$(VENV)/bin/embedwatch config docs -o docs/configuration.md
	$(VENV)/bin/embedwatch config metrics-docs -o docs/metrics.md
	$(PY) scripts/sync-chart

clean:
	-scripts/kafka-local stop
	rm -rf .pytest_cache .mypy_cache .ruff_cache
