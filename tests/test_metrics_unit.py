"""FUSE request metrics as Prometheus exposes them, from the plain counts the event loop
keeps (azregfs/ops/metrics.py: Metrics.fuse_done, _FuseCollector). The whole path, with a
real Prometheus scraping a mount, is tests/test_metrics.py."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from azregfs.ops.metrics import LATENCY_BUCKETS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_fuse_latency_buckets_are_cumulative_and_agree_with_the_count_served() -> None:
    metrics = Metrics("c")
    latencies = [0.0004, 0.001, 0.002, 0.7, 100.0]  # 0.001 is in its own bucket (le)
    for seconds in latencies:
        metrics.fuse_done("write", seconds, None)
    metrics.fuse_done("lookup", 0.0001, 2)
    seen = samples(metrics)

    def value(name: str, **labels: str) -> float:
        return seen[(name, tuple(sorted({"container": "c", **labels}.items())))]

    assert value("azregfs_fuse_operations_total", operation="write") == 5
    assert value("azregfs_fuse_operations_total", operation="lookup") == 1
    assert value("azregfs_fuse_errors_total", operation="lookup", errno="ENOENT") == 1
    histogram = "azregfs_fuse_operation_duration_seconds"
    for bound in LATENCY_BUCKETS:
        le = str(float(bound))
        assert value(f"{histogram}_bucket", operation="write", le=le) == \
            sum(seconds <= bound for seconds in latencies), bound
    assert value(f"{histogram}_bucket", operation="write", le="+Inf") == 5
    assert value(f"{histogram}_count", operation="write") == 5
    assert value(f"{histogram}_sum", operation="write") == sum(latencies)
    assert metrics.snapshot()["fuse"]["operations"] == {"write": 5, "lookup": 1}
