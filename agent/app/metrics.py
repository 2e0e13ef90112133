"""Counters for ``GET /metrics``, rendered by prometheus_client at scrape time.

The hot path only bumps plain integers here; prometheus_client (the
reference implementation of the Prometheus text format, so no format of our
own) is imported on the first scrape, through a custom collector that turns
these numbers into metric families.  An idle sidecar that nobody scrapes
never pays for it.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

# Attestation latency buckets, seconds: a launch is milliseconds on a local
# owner and up to the owner timeout on a slow one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def bucket_index(seconds: float) -> int:
    """The histogram bucket of ``seconds``: the first bound it does not exceed
    (Prometheus' ``le``), or the last, +Inf, one.  ``bisect.bisect_left`` on a
    dozen bounds, without ``bisect`` (and its ``_bisect``) in every idle sidecar."""
    return sum(1 for bound in LATENCY_BUCKETS if bound < seconds)


class Metrics:
    def __init__(self) -> None:
        self.flows_started: Tally = Tally()
        self.flows_finished: Tally = Tally()  # (kind, result)
        self.migrations: Tally = Tally()  # (role, status)
        self.secrets_added = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.qmp_connected = False
        self.events_dropped = lambda: 0

    def flow_started(self, kind: str) -> None:
        self.flows_started[kind] += 1

    def flow_finished(self, kind: str, code: int, seconds: float, flow=None) -> None:
        self.flows_finished[(kind, "completed" if code == 0 else "failed")] += 1
        if kind == "sev-launch" and code == 0:
            self.latency_counts[bucket_index(seconds)] += 1
            self.latency_sum += seconds
        if kind == "migration" and flow is not None:
            self.migrations[(flow.params.role, flow.final_status or "failed")] += 1

    # -- scrape ----------------------------------------------------------------
    def collect(self):
        return self.families()

    def families(self, vm: str | None = None):
        """The metric families; with ``vm`` (``keyagent host``), each sample
        carries a ``vm`` label first (see :class:`HostMetrics`)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        lead = [] if vm is None else ["vm"]
        at = [] if vm is None else [vm]
        started = CounterMetricFamily("keyagent_flows_started", "Flows started, by kind", labels=[*lead, "kind"])
        for kind, n in sorted(self.flows_started.items()):
            started.add_metric([*at, kind], n)
        finished = CounterMetricFamily(
            "keyagent_flows_finished", "Flows finished, by kind and result", labels=[*lead, "kind", "result"]
        )
        for (kind, result), n in sorted(self.flows_finished.items()):
            finished.add_metric([*at, kind, result], n)
        migrations = CounterMetricFamily(
            "keyagent_migrations", "Migrations, by role and status", labels=[*lead, "role", "status"]
        )
        for (role, status), n in sorted(self.migrations.items()):
            migrations.add_metric([*at, role, status], n)
        secrets = CounterMetricFamily("keyagent_secrets_added", "Encrypted secret objects added to QEMU", labels=lead)
        secrets.add_metric(at, self.secrets_added)
        buckets, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        latency = HistogramMetricFamily(
            "keyagent_attestation_seconds", "SEV launch attestation, start to cont", labels=lead
        )
        latency.add_metric(at, buckets, self.latency_sum)
        connected = GaugeMetricFamily("keyagent_qmp_connected", "1 while QMP is connected", labels=lead)
        connected.add_metric(at, 1 if self.qmp_connected else 0)
        dropped = CounterMetricFamily(
            "keyagent_qmp_events_dropped", "QMP events dropped because the queue was full", labels=lead
        )
        dropped.add_metric(at, self.events_dropped())
        return [started, finished, migrations, secrets, latency, connected, dropped]

    def render(self) -> tuple[bytes, str]:
        return _render(self)


def _render(collector) -> tuple[bytes, str]:
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class HostMetrics:
    """``keyagent host``'s ``/metrics``: every VM's families merged, each
    sample labelled with its ``vm``, plus how many VMs are in each state.

    ``source()`` returns ``[(vm, Metrics)]`` and ``{state: count}`` at scrape
    time: VMs come and go, and nothing is registered or unregistered.
    """

    def __init__(self, source) -> None:
        self.source = source

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        per_vm, states = self.source()
        merged: dict[str, Any] = {}
        for vm, metrics in per_vm:
            for family in metrics.families(vm):
                into = merged.setdefault(family.name, family)
                if into is not family:
                    into.samples.extend(family.samples)
        vms = GaugeMetricFamily("keyagent_host_vms", "VMs of this host, by state", labels=["state"])
        for state, n in sorted(states.items()):
            vms.add_metric([state], n)
        return [*merged.values(), vms]

    def render(self) -> tuple[bytes, str]:
        return _render(self)
