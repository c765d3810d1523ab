"""A Prometheus endpoint per service (prometheus-client), off by default.

`[metrics] port = 9464` in a service's config serves `/metrics` on 127.0.0.1 (`host` to
widen it). Each scrape reads the service's telemetry snapshot (hfl.runtime.telemetry): the counters
its node, gate and MQTT session keep and the rounds its actions told; nothing is counted a
second time for Prometheus. Every sample has the labels `role` and `node`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import CollectorRegistry

from hfl.runtime.telemetry import Telemetry

# Counts field → (metric name without _total, help).
COUNTERS = {
    "messages_in": ("hfl_messages_received", "Envelopes accepted: verified, not a repeat."),
    "messages_out": ("hfl_messages_sent", "Envelopes sent (status messages aside)."),
    "bytes_in": ("hfl_received_bytes", "MQTT payload bytes received."),
    "bytes_out": ("hfl_sent_bytes", "Bytes of the envelopes sent."),
    "duplicates": ("hfl_duplicates", "Repeats dropped (QoS 1 redelivery, retained copy)."),
    "connects": ("hfl_connects", "Connections to the broker made."),
    "disconnects": ("hfl_disconnects", "Connections to the broker lost or closed."),
    "internal_errors": ("hfl_internal_errors", "Messages a bug of ours failed to handle."),
    "unsendable": ("hfl_unsendable", "Messages with no known recipient left."),
    "checkpoints": ("hfl_checkpoints", "State saves (a durable aggregator or coordinator)."),
    "checkpoint_errors": ("hfl_checkpoint_errors", "State saves that failed (a full disk): "
                          "nothing is acknowledged or sent until one works."),
    "registry_errors": ("hfl_registry_errors", "Coordinator: versions or job states the "
                        "registry could not store."),
    "rounds": ("hfl_rounds", "Aggregator: edge rounds closed; agent: updates sent; "
               "coordinator: model versions published."),
    "retries": ("hfl_retries", "Edge rounds (aggregator) or blocks (coordinator) retried."),
    "failures": ("hfl_failures", "Blocks failed (aggregator) or jobs failed (coordinator)."),
    "updates": ("hfl_updates", "Aggregator: agents' updates summed in its closed rounds."),
    "dropped": ("hfl_dropped_agents", "Aggregator: agents whose masks were recovered."),
}
LABELS = ["role", "node"]


class TelemetryCollector:
    """Reads one node's telemetry at each scrape."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        ident = telemetry.node.identity
        self.labels = [ident.role.value, ident.id]

    def collect(self) -> Iterator[Metric]:
        t, labels = self.telemetry, self.labels
        meta = t.meta(time.time())
        for name, value in meta.counts.model_dump().items():
            metric, help_ = COUNTERS[name]
            yield _one(CounterMetricFamily(metric, help_, labels=LABELS), labels, value)
        for name, help_, counts in (
                ("hfl_rejections", "Messages refused, by reason.", meta.rejections),
                ("hfl_declines", "Rounds sat out, by reason (an agent's own; at an "
                 "aggregator, its agents').", meta.declines)):
            family = CounterMetricFamily(name, help_, labels=[*LABELS, "reason"])
            for reason, n in sorted(counts.items()):
                family.add_metric([*labels, reason], n)
            yield family
        st = t.stats
        rounds = HistogramMetricFamily(
            "hfl_round_duration_seconds", "Aggregator: edge round, open to closed; agent: "
            "round open to update sent; coordinator: global round, tasks to version.",
            labels=LABELS)
        rounds.add_metric(labels, [(_le(b), n) for b, n in st.cumulative_buckets()],
                          sum_value=st.round_total)
        yield rounds
        eps = GaugeMetricFamily("hfl_epsilon_spent", "Privacy budget ε spent, per DP job "
                                "(coordinator).", labels=[*LABELS, "job"])
        for job, e in sorted(meta.epsilon.items()):
            eps.add_metric([*labels, job], e)
        yield eps
        yield _one(GaugeMetricFamily("hfl_connected", "1 while connected to the broker.",
                                     labels=LABELS), labels, int(t.node.session.connected))
        yield _one(GaugeMetricFamily("hfl_uptime_seconds", "Seconds since the service "
                                     "started.", labels=LABELS), labels, meta.uptime_s)
        if meta.restarts is not None:
            yield _one(GaugeMetricFamily("hfl_restarts", "Starts before this one on the "
                                         "service's state folder.", labels=LABELS), labels,
                       meta.restarts)
        for name, help_, f in (
                ("hfl_blocks_failing", "Aggregator: blocks failed in a row (0: the last "
                 "worked), for the job that failed last.", meta.failing),
                ("hfl_saves_failing", "State saves failed in a row now (a full disk).",
                 meta.saves_failing)):
            yield _one(GaugeMetricFamily(name, help_, labels=LABELS), labels,
                       f.count if f else 0)


def _one(family: CounterMetricFamily | GaugeMetricFamily, labels: list[str],
         value: float) -> Metric:
    family.add_metric(labels, value)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(telemetry: Telemetry, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve `/metrics` for one node from a daemon thread (port 0: any free port);
    OSError when the address cannot be bound."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TelemetryCollector(telemetry))
    server, thread = start_http_server(port, host, registry)
    return MetricsServer(server, thread)
