"""The names, types, labels and help of every metric embedwatch exports: one table, one place.

The exporter, the alert rules, the dashboards and docs/metrics.md all follow this table; a test
checks that every metric a rule or a dashboard uses is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STREAM_LABELS = ("model", "model_version", "segment")

MetricType = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True)
class Metric:
    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    # For per-stream detection gauges: the key in StreamMonitor.measures() that feeds it.
    measure: str | None = None
    buckets: tuple[float, ...] = ()


SIMILARITY_BUCKETS = (-0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
NORM_BUCKETS = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.01, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
PROCESSING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

S = STREAM_LABELS

METRICS: tuple[Metric, ...] = (
    # --- service health -------------------------------------------------------------------
    Metric("embedwatch_build_info", "gauge", "Build information (value 1).", ("version", "python")),
    Metric("embedwatch_up", "gauge", "1 while the service loop goes round; 0 once it has not for 120 s (stuck: "
           "/healthz answers 503 too) or has stopped. Read at each scrape."),
    Metric("embedwatch_kafka_connected", "gauge", "1 when the broker answered the last poll, else 0."),
    Metric("embedwatch_ready", "gauge", "1 when partitions are assigned and the broker answers."),
    Metric("embedwatch_assigned_partitions", "gauge", "Partitions assigned to this replica."),
    Metric("embedwatch_rebalances_total", "counter", "Partition assignments and revocations seen."),
    Metric("embedwatch_consumer_lag_messages", "gauge", "Log end offset minus position.",
           ("topic", "partition")),
    Metric("embedwatch_consumed_events_total", "counter",
           "Events read per partition by outcome (accepted, dead_lettered); restored from committed "
           "offsets' metadata so it reconciles across restarts. A ledger: rates come from "
           "embedwatch_processed_events_total.", ("topic", "partition", "outcome")),
    Metric("embedwatch_processed_events_total", "counter",
           "Events this process read and processed, per topic by outcome (accepted, dead_lettered), replays "
           "included. Starts at 0 with the process, so rate() of it is throughput; the ledger "
           "embedwatch_consumed_events_total resumes from the committed offsets' metadata, and a restart "
           "or a partition coming back makes it jump.", ("topic", "outcome")),
    Metric("embedwatch_events_replayed_total", "counter",
           "Events processed again after a restart or rebalance (at-least-once replay).", ("topic",)),
    Metric("embedwatch_batches_total", "counter", "Poll batches processed."),
    Metric("embedwatch_poll_max_records", "gauge",
           "Records the next poll asks for at most: kafka.max_poll_records, raised after a batch spread over "
           "many streams (kafka.poll_events_per_stream per stream, within kafka.max_poll_bytes)."),
    Metric("embedwatch_checkpoints_total", "counter",
           "State checkpoints made (state.backend kafka or file): each partition's state written, or "
           "found unchanged since its last checkpoint."),
    Metric("embedwatch_checkpoint_bytes_total", "counter",
           "Bytes of checkpoint records written to the state backend (unchanged partitions are not "
           "written again)."),
    Metric("embedwatch_last_checkpoint_timestamp_seconds", "gauge", "When the last checkpoint was made."),
    Metric("embedwatch_state_storage_lost_total", "counter",
           "Times the state backend found its storage gone and started again empty (the state topic deleted while "
           "the service ran, and created again, compacted, by this replica or another; the state directory "
           "emptied or deleted): checkpoints are written again, stored baselines are lost (alert "
           "EmbedwatchStateLost)."),
    Metric("embedwatch_stored_baselines", "gauge",
           "Baseline versions this replica's baseline store holds in memory: with durable state, every stored "
           "version of every stream of the group (up to 5 a stream, its query embeddings' apart), monitored here or "
           "not."),
    Metric("embedwatch_stored_baseline_bytes", "gauge",
           "Bytes of the arrays of those versions (a stored version is held without its reference sample; its "
           "mean-shift scan fit is most of it, about 0.4 MiB at 768-d). It grows with every stream ever seen: "
           "forget retired streams (POST /api/baselines/<stream>/forget). Counted again at a scrape after a change of "
           "the held versions, else at most a minute old."),
    Metric("embedwatch_commits_total", "counter", "Offset commits by result.", ("result",)),
    Metric("embedwatch_processing_seconds", "histogram", "Time to decode and process one poll batch.",
           buckets=PROCESSING_BUCKETS),
    Metric("embedwatch_streams", "gauge", "Live streams (capped by limits.max_streams)."),
    Metric("embedwatch_stream_partition_conflicts_total", "counter",
           "Streams found in more than one partition number (their events not keyed by stream, or the "
           "embeddings and queries topics of unequal partition counts), and assignments whose embeddings and "
           "queries partitions differ: replicas may each monitor part of a stream (docs/deploy.md)."),
    Metric("embedwatch_streams_forgotten_total", "counter",
           "Streams forgotten after limits.stream_idle_s without an event (at the minute's check or at a "
           "restore): their max_streams slot and series freed."),
    Metric("embedwatch_events_total", "counter", "Accepted events.", (*S, "kind")),
    Metric("embedwatch_events_rejected_total", "counter", "Dead-lettered events by reason.",
           ("topic", "reason")),
    Metric("embedwatch_stream_rejected_total", "counter",
           "Dead-lettered events of a live stream by reason (non_finite, zero_vector, "
           "dimension_mismatch...).", (*S, "reason")),
    Metric("embedwatch_dead_letter_errors_total", "counter", "Failures to write to a dead-letter topic."),
    Metric("embedwatch_last_event_timestamp_seconds", "gauge", "Timestamp of the newest event.", S),
    Metric("embedwatch_event_lag_seconds", "histogram", "Processing time minus event timestamp.", S,
           buckets=LAG_BUCKETS),
    Metric("embedwatch_inference_latency_seconds", "histogram",
           "Model inference latency reported by embedding events.", S, buckets=LATENCY_BUCKETS),
    # --- baselines ----------------------------------------------------------------------------
    Metric("embedwatch_baseline_info", "gauge", "The active baseline of a stream (value 1).",
           (*S, "baseline_id", "source")),
    Metric("embedwatch_baseline_ready", "gauge",
           "1 when the stream has a baseline; 0 while it collects its reference events. A stream with "
           "only query events so far: 1 once its query embeddings have a baseline (without query "
           "embeddings: once its top-1 score reference is complete).", S,
           measure="baseline_ready"),
    Metric("embedwatch_baseline_events", "gauge", "Events in the active baseline.", S,
           measure="baseline_events"),
    Metric("embedwatch_baseline_age_seconds", "gauge", "Age of the active baseline.", S,
           measure="baseline_age_seconds"),
    # --- embedding drift ----------------------------------------------------------------------
    Metric("embedwatch_embedding_dimension", "gauge", "Dimension of the stream's vectors.", S,
           measure="dimension"),
    Metric("embedwatch_window_events", "gauge", "Events in the rolling window.", S, measure="window_events"),
    Metric("embedwatch_centroid_cosine_distance", "gauge",
           "1 - cosine(window centroid, baseline centroid).", S, measure="centroid_cosine_distance"),
    Metric("embedwatch_centroid_euclidean_distance", "gauge",
           "Euclidean distance between window and baseline centroids.", S,
           measure="centroid_euclidean_distance"),
    Metric("embedwatch_similarity_ks_statistic", "gauge",
           "KS statistic of cosine-similarity-to-baseline-centroid, window vs baseline.", S,
           measure="similarity_ks_statistic"),
    Metric("embedwatch_similarity_ks_p_value", "gauge", "p-value of that KS test.", S,
           measure="similarity_ks_p_value"),
    Metric("embedwatch_similarity_wasserstein", "gauge",
           "Wasserstein-1 distance of the similarity distributions.", S, measure="similarity_wasserstein"),
    Metric("embedwatch_similarity_psi", "gauge", "Population stability index of the similarity "
           "distributions.", S, measure="similarity_psi"),
    Metric("embedwatch_similarity_js_divergence", "gauge", "Jensen-Shannon divergence (base 2) of the "
           "similarity distributions.", S, measure="similarity_js_divergence"),
    Metric("embedwatch_norm_ks_statistic", "gauge", "KS statistic of vector norms, window vs baseline.", S,
           measure="norm_ks_statistic"),
    Metric("embedwatch_norm_mean_relative_change", "gauge",
           "(window mean norm - baseline mean norm) / baseline mean norm.", S,
           measure="norm_mean_relative_change"),
    Metric("embedwatch_dimensions_drifted_ratio", "gauge",
           "Share of dimensions whose mean moved (Welch t-test, Benjamini-Hochberg corrected).", S,
           measure="dimensions_drifted_ratio"),
    Metric("embedwatch_drift_score", "gauge", "Multivariate two-sample statistic (MMD^2, random "
           "Fourier features).", S, measure="drift_score"),
    Metric("embedwatch_drift_threshold", "gauge",
           "Calibrated rejection threshold of drift_score at the configured false-alarm rate.", S,
           measure="drift_threshold"),
    Metric("embedwatch_mean_shift_threshold_ratio", "gauge",
           "Recent-window mean-shift test at the last scan: statistic / calibrated threshold of the most "
           "significant recent window (> 1: that window rejects).", S, measure="mean_shift_threshold_ratio"),
    Metric("embedwatch_mean_shift_score", "gauge",
           "Effect size of that window: debiased squared whitened distance of its mean to the baseline "
           "mean (compared with detection.scan_effect_floor).", S, measure="mean_shift_score"),
    Metric("embedwatch_drift_p_value", "gauge", "p-value of the multivariate test.", S,
           measure="drift_p_value"),
    Metric("embedwatch_drift_effect_floor", "gauge", "Configured minimum effect size.", S,
           measure="drift_effect_floor"),
    Metric("embedwatch_drift_detected", "gauge", "1 while the stream is drifting (test rejects and "
           "effect above floor).", S, measure="drift_detected"),
    Metric("embedwatch_drift_alarms_total", "counter", "Times the stream entered the drifting state.", S),
    Metric("embedwatch_changepoint_score", "gauge", "Page-Hinkley statistic over the per-event "
           "similarity-to-baseline score.", S, measure="changepoint_score"),
    Metric("embedwatch_changepoints_total", "counter", "Change points detected over time.", S),
    Metric("embedwatch_duplicate_ids_total", "counter", "Events whose id repeated within the window.", S),
    Metric("embedwatch_embedding_norm", "histogram", "L2 norm of accepted vectors.", S,
           buckets=NORM_BUCKETS),
    Metric("embedwatch_similarity_to_baseline", "histogram",
           "Cosine similarity of each vector to its stream's baseline centroid (buckets from -0.5: "
           "no _sum or _count series).", S,
           buckets=SIMILARITY_BUCKETS),
    # --- queries ------------------------------------------------------------------------------
    Metric("embedwatch_query_top1_score", "histogram", "Top-1 retrieval score of query events.", S,
           buckets=SCORE_BUCKETS),
    Metric("embedwatch_query_top1_ks_statistic", "gauge", "KS statistic of top-1 scores, window vs "
           "baseline.", S, measure="query_top1_ks_statistic"),
    Metric("embedwatch_query_top1_ks_p_value", "gauge", "p-value of that KS test.", S,
           measure="query_top1_ks_p_value"),
    Metric("embedwatch_query_no_match_ratio", "gauge",
           "Share of window queries whose top-1 score is below detection.no_match_threshold.", S,
           measure="query_no_match_ratio"),
    Metric("embedwatch_query_results_mean", "gauge", "Mean number of results per query in the window.", S,
           measure="query_result_count"),
    Metric("embedwatch_query_precision_at_k", "gauge", "Mean precision@k over labelled window queries.",
           S, measure="query_precision_at_k"),
    Metric("embedwatch_query_recall_at_k", "gauge", "Mean recall@k over labelled window queries.", S,
           measure="query_recall_at_k"),
    Metric("embedwatch_query_drift_detected", "gauge",
           "1 while the stream's query embeddings are drifting (their own window, baseline and tests, "
           "alarms of detector mmd_query); absent for a stream without query embeddings.", S,
           measure="query_drift_detected"),
    Metric("embedwatch_query_drift_score", "gauge",
           "MMD^2 drift score of the query embeddings' window against their baseline.", S,
           measure="query_drift_score"),
    Metric("embedwatch_query_latency_seconds", "histogram", "End-to-end retrieval latency of queries.", S,
           buckets=LATENCY_BUCKETS),
    # --- model version comparison --------------------------------------------------------------
    Metric("embedwatch_version_paired_cosine", "gauge",
           "Mean cosine similarity of the same ids embedded by two versions (same dim only).",
           ("model", "model_version", "reference_version")),
    Metric("embedwatch_version_knn_overlap", "gauge",
           "Mean overlap@k of the k-NN neighbourhoods of shared ids under two versions.",
           ("model", "model_version", "reference_version")),
    Metric("embedwatch_version_shared_ids", "gauge", "Ids seen under both versions (probe set).",
           ("model", "model_version", "reference_version")),
    Metric("embedwatch_version_dimension_changed", "gauge", "1 when the two versions' dimensions differ.",
           ("model", "model_version", "reference_version")),
)

BY_NAME = {m.name: m for m in METRICS}


def reference_markdown() -> str:
    """docs/metrics.md, generated from :data:`METRICS` (a test keeps the file current)."""
    out = [
        "# Metrics reference",
        "",
        "Generated from `service/embedwatch/metrics_catalog.py` (`embedwatch config metrics-docs`). Prefix",
        "`embedwatch_`, base units, `_total` for counters. Stream labels are `model`, `model_version`,",
        "`segment`; the number of streams is capped by `limits.max_streams`, so no label is unbounded.",
        "Besides these, the standard `process_*` and `python_*` metrics of prometheus-client are exported.",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        labels = ", ".join(m.labels) or "-"
        out.append(f"| `{m.name}` | {m.type} | {labels} | {m.help} |")
    out.append("")
    return "\n".join(out)
