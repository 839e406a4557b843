"""Operators' instruments: what the daemon counts, and how it is shown.

One ``Metrics`` object per daemon owns every counter. It is fed from three places and read
from three others:

- fed by ``RequestMeter``, an azure-core pipeline policy that sees every HTTP attempt the
  driver makes (retries included, in the driver's worker threads): the Azure operation
  named from the request itself (``classify``), its outcome (status class and service
  error code), its latency, data bytes up and down, retries and throttled answers;
- fed by the FUSE operations (``fuse_done``): count, latency and errno of each request;
- fed at read time by live objects (cache, write buffer, namespace, handles): gauges and
  their counters are read when asked, never copied (``Metrics.bind``);
- read by Prometheus (``metrics_addr``: prometheus_client's own HTTP server, in a thread of
  its own, never on the event loop), by ``azregfs stats`` and ``azregfs check`` (the JSON
  of the control file ``MNT/.azregfs/stats``, ``Metrics.snapshot``; see control.py), and
  by the debug log, which shows each Azure request next to the FUSE operation that caused
  it.

Invariants: the JSON counters and the Prometheus counters are the same numbers, counted at
one place; labels have low cardinality (operation, status class, error code, errno, tier)
and never carry a blob name; every metric carries ``container``.
"""

from __future__ import annotations

import bisect
import contextvars
import errno as errno_module
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from ..config import parse_address
from ..storage.throttle import Concurrency

log = logging.getLogger(__name__)

# The FUSE operation a trio task is serving; worker threads and tasks started from it
# inherit it, so the request log can say which kernel request an Azure request serves.
fuse_operation: contextvars.ContextVar[str] = contextvars.ContextVar("fuse_operation",
                                                                     default="-")

# Request kinds that carry blob data, and in which direction.
UPLOADS = frozenset({"put", "stage_block", "append_block"})
DOWNLOADS = frozenset({"read"})
THROTTLE_CODES = frozenset({"ServerBusy", "OperationTimedOut"})
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


def classify(method: str, url: str, headers: Any) -> str:
    """The Azure operation of one request, from its method, query string and headers
    (shared with the fault proxy, so its counts and ours use the same names).

    HEAD: head (container_properties with restype=container); GET: list (comp=list),
    get_block_list (comp=blocklist), container_properties (restype=container), read, or
    get_<comp>; PUT: stage_block, commit_block_list, set_metadata, append_block (by comp),
    copy (x-ms-copy-source), create_container (restype=container), put, or put_<comp>;
    DELETE: delete (delete_container with restype=container); anything else: the method
    in lower case.
    """
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    comp = (query.get("comp") or [""])[0].lower()
    container = (query.get("restype") or [""])[0].lower() == "container"
    method = method.upper()
    if method == "HEAD":
        return "container_properties" if container and not comp else "head"
    if method == "GET":
        if comp == "list":
            return "list"
        if comp == "blocklist":
            return "get_block_list"
        if comp:
            return f"get_{comp}"
        return "container_properties" if container else "read"
    if method == "PUT":
        named = {"block": "stage_block", "blocklist": "commit_block_list",
                 "metadata": "set_metadata", "appendblock": "append_block"}
        if comp in named:
            return named[comp]
        if comp:
            return f"put_{comp}"
        if headers.get("x-ms-copy-source"):
            return "copy"
        return "create_container" if container else "put"
    if method == "DELETE":
        return "delete_container" if container and not comp else "delete"
    return method.lower()


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


def is_throttle(status: int | None, code: str) -> bool:
    return status == 503 or code in THROTTLE_CODES


def healthy(status: int | None) -> bool:
    """Did the service answer as a working service does? (404 and 409 are answers; an
    authentication refusal, a throttle or a server error are not)."""
    return status is not None and status < 500 and status not in (401, 403, 408, 429)


class RequestMeter(SansIOHTTPPolicy):
    """Counts and times every HTTP attempt (a per-retry policy: it sees each retry)."""

    def __init__(self, metrics: Metrics, concurrency: Concurrency | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.concurrency = concurrency  # told of throttles and successes (AIMD)

    def on_request(self, request: PipelineRequest) -> None:
        context = request.context
        attempt = context.get("azregfs_attempt", 0) + 1
        context["azregfs_attempt"] = attempt
        context["azregfs_started"] = time.monotonic()
        http = request.http_request
        context["azregfs_op"] = classify(http.method, http.url, http.headers)

    def on_response(self, request: PipelineRequest, response: PipelineResponse) -> None:
        http = response.http_response
        headers = http.headers
        self._done(request, http.status_code, headers.get("x-ms-error-code") or "",
                   headers.get("x-ms-request-id") or "", headers.get("Content-Length"))

    def on_exception(self, request: PipelineRequest) -> None:
        self._done(request, None, "", "", None)

    def _done(self, request: PipelineRequest, status: int | None, code: str, request_id: str,
              response_length: str | None) -> None:
        context = request.context
        op = context.get("azregfs_op", "unknown")
        seconds = time.monotonic() - context.get("azregfs_started", time.monotonic())
        up = down = 0
        if status is not None and status < 300:
            if op in UPLOADS:
                up = int(request.http_request.headers.get("Content-Length") or 0)
            elif op in DOWNLOADS and response_length:
                down = int(response_length)
        self.metrics.azure_done(op, status, code, seconds, up, down,
                                retry=context["azregfs_attempt"] > 1)
        if self.concurrency is not None:
            if is_throttle(status, code):
                self.concurrency.throttled()
            elif status is not None and status < 400:
                self.concurrency.succeeded()
        if log.isEnabledFor(logging.DEBUG):
            url = urlsplit(request.http_request.url)
            path = url.path
            if op == "list":  # which listing: its prefix, delimiter, size and page
                query = parse_qs(url.query)
                path += "?" + " ".join(
                    f"{key}={query[key][0]!r}" for key in
                    ("prefix", "delimiter", "maxresults", "marker") if key in query)
            elif "x-ms-range" in request.http_request.headers:  # which bytes
                path += " " + request.http_request.headers["x-ms-range"]
            log.debug("azure %s %s -> %s%s %.1f ms%s [fuse %s]", op, path, status or "error",
                      f" {code}" if code else "", seconds * 1000,
                      f" request-id {request_id}" if request_id and status and status >= 400
                      else "", fuse_operation.get())


class Metrics:
    """Every counter of one daemon; thread-safe (the request meter runs in worker threads)."""

    def __init__(self, container: str) -> None:
        self.container = container
        self.started = time.time()
        self.lock = threading.Lock()
        # The daemon's own counters: the JSON snapshot shows them as they are.
        self.requests: Counter[str] = Counter()
        self.retries = 0
        self.throttled = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_request_at = 0.0  # wall time of the last answered or failed attempt
        self.last_request_ok = True
        self.last_request_outcome = ""
        self.fuse_errors: Counter[str] = Counter()  # the event loop's thread only
        # FUSE requests by operation: counts per LATENCY_BUCKETS bound (the last: +Inf; their
        # sum is the requests served), and the sum of seconds. Plain numbers, read at
        # snapshot and scrape time (_FuseCollector).
        self.fuse_latency: dict[str, list[int]] = {}
        self.fuse_seconds: Counter[str] = Counter()
        self.live: Callable[[], dict[str, Any]] = dict  # read at snapshot/scrape time

        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("container",)
        self._azure_requests = PromCounter(
            "azregfs_azure_requests", "Azure Blob requests (each attempt, retries included)",
            labels + ("operation", "status_class", "error_code"), registry=self.registry)
        self._azure_seconds = Histogram(
            "azregfs_azure_request_duration_seconds", "Azure Blob request latency",
            labels + ("operation",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self._azure_retries = PromCounter(
            "azregfs_azure_retries", "Azure requests that were retries of a failed attempt",
            labels + ("operation",), registry=self.registry)
        self._azure_throttled = PromCounter(
            "azregfs_azure_throttled", "Azure answers asking us to slow down (503 ServerBusy,"
            " 500 OperationTimedOut)", labels + ("operation",), registry=self.registry)
        self._azure_bytes = PromCounter(
            "azregfs_azure_data_bytes", "Blob data moved to (up) and from (down) Azure",
            labels + ("direction",), registry=self.registry)
        self._fuse_errors = PromCounter(
            "azregfs_fuse_errors", "FUSE requests answered with an error",
            labels + ("operation", "errno"), registry=self.registry)
        for direction in ("up", "down"):  # shown as 0 from the start, as rate() wants
            self._azure_bytes.labels(container, direction)
        self.registry.register(_LiveCollector(self))
        self.registry.register(_FuseCollector(self))
        self.registry.register(_Labelled(ProcessCollector(registry=None), container))

    def bind(self, live: Callable[[], dict[str, Any]]) -> None:
        """The function that reads the live objects' numbers (see ``_LIVE``)."""
        self.live = live

    # -- feeding ----------------------------------------------------------------------------

    def azure_done(self, op: str, status: int | None, code: str, seconds: float, up: int,
                   down: int, retry: bool) -> None:
        throttled = is_throttle(status, code)
        ok = healthy(status)
        with self.lock:
            self.requests[op] += 1
            self.bytes_up += up
            self.bytes_down += down
            self.retries += retry
            self.throttled += throttled
            self.last_request_at = time.time()
            self.last_request_ok = ok
            self.last_request_outcome = f"{op} {status or 'no answer'}{' ' + code if code else ''}"
        container = self.container
        self._azure_requests.labels(container, op, status_class(status), code).inc()
        self._azure_seconds.labels(container, op).observe(seconds)
        if retry:
            self._azure_retries.labels(container, op).inc()
        if throttled:
            self._azure_throttled.labels(container, op).inc()
        if up:
            self._azure_bytes.labels(container, "up").inc(up)
        if down:
            self._azure_bytes.labels(container, "down").inc(down)

    def fuse_done(self, op: str, seconds: float, error: int | None) -> None:
        """Called for every FUSE request, from the event loop's thread only: kept cheap (a
        4 KiB write is one call), hence plain counts rather than prometheus_client's
        Counter and Histogram, which take a lock per number (3.7 µs a request of the
        daemon's CPU, measured on 32 KiB writes)."""
        counts = self.fuse_latency.get(op)
        if counts is None:
            counts = self.fuse_latency[op] = [0] * (len(LATENCY_BUCKETS) + 1)
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.fuse_seconds[op] += seconds
        if error:
            self.fuse_errors[op] += 1
            name = errno_module.errorcode.get(error, str(error))
            self._fuse_errors.labels(self.container, op, name).inc()

    # -- reading ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything, as the JSON of ``.azregfs/stats`` (azregfs stats / check)."""
        with self.lock:
            azure = {
                "requests": dict(self.requests), "retries": self.retries,
                "throttled": self.throttled, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "last_request": {
                    "ok": self.last_request_ok, "outcome": self.last_request_outcome,
                    "age_seconds": round(time.time() - self.last_request_at, 3)
                    if self.last_request_at else None,
                },
            }
        fuse = {"operations": {op: sum(counts) for op, counts in
                               list(self.fuse_latency.items())},
                "errors": dict(self.fuse_errors)}
        return {"container": self.container, "uptime_seconds": round(time.time() - self.started,
                                                                      3),
                "driver": azure, "fuse": fuse, **self.live()}


# The live numbers: snapshot key -> (metric name, type, help). Nested dicts ("cache") are
# flattened as "cache.hits". Counters are monotonic counts kept by their owners.
_LIVE: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "cache.memory_hits": ("azregfs_cache_hits", "counter", "Block reads a cache tier served: "
                          "memory counts readers, disk also counts read-ahead", {}),
    "cache.memory_misses": ("azregfs_cache_misses", "counter", "Block reads a cache tier "
                            "could not serve (memory: went to disk or Azure; disk: to Azure)",
                            {}),
    "cache.evictions": ("azregfs_cache_evictions", "counter", "Blocks evicted", {}),
    "cache.disk_hits": ("azregfs_cache_hits", "counter", "", {"tier": "disk"}),
    "cache.disk_misses": ("azregfs_cache_misses", "counter", "", {"tier": "disk"}),
    "cache.disk_evictions": ("azregfs_cache_evictions", "counter", "", {"tier": "disk"}),
    "cache.disk_writes": ("azregfs_cache_disk_writes", "counter",
                          "Blocks written to the disk cache", {}),
    "cache.disk_errors": ("azregfs_cache_disk_errors", "counter",
                          "Disk cache reads or writes that failed", {}),
    "cache.prefetched": ("azregfs_cache_prefetched_blocks", "counter",
                         "Blocks fetched by read-ahead", {}),
    "cache_bytes": ("azregfs_cache_bytes", "gauge", "Bytes held by the block cache", {}),
    "cache_disk_bytes": ("azregfs_cache_bytes", "gauge", "", {"tier": "disk"}),
    "dirty_bytes": ("azregfs_dirty_bytes", "gauge",
                    "Written bytes held in memory, not yet staged in Azure", {}),
    "dirty_budget": ("azregfs_dirty_budget_bytes", "gauge",
                     "The dirty_budget: writers wait when dirty bytes reach it", {}),
    "writer_wait_seconds": ("azregfs_writer_wait_seconds", "counter",
                            "Seconds writers spent waiting for room in the dirty budget", {}),
    "commits": ("azregfs_commits", "counter", "Files committed (Put Blob / Put Block List "
                "/ Append Block)", {}),
    "commit_failures": ("azregfs_commit_failures", "counter",
                        "Commits that failed (reported to the writer as EIO)", {}),
    "open_handles": ("azregfs_open_handles", "gauge", "Open file handles", {}),
    "write_sessions": ("azregfs_write_sessions", "gauge",
                       "Files open for writing (write sessions)", {}),
    "inodes": ("azregfs_inodes", "gauge", "Inodes the kernel holds references to", {}),
    "inodes_asked_to_drop": ("azregfs_inodes_asked_to_drop", "counter",
                             "Entries the kernel was asked to drop past max_inodes", {}),
    "azure_concurrency": ("azregfs_azure_concurrency_limit", "gauge",
                          "Requests allowed in flight now (halved when throttled)", {}),
}
_TIERED = {"azregfs_cache_hits", "azregfs_cache_misses", "azregfs_cache_evictions",
           "azregfs_cache_bytes"}


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class _LiveCollector:
    """Reads the live objects at scrape time: nothing is copied between scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on what the live objects report

    def collect(self) -> Iterable[Metric]:
        live = dict(_flatten(self.metrics.live()))
        families: dict[str, Metric] = {}
        helps = {name: text for name, _, text, _ in _LIVE.values() if text}
        for key, (name, kind, _, extra) in _LIVE.items():
            if key not in live:
                continue
            label_names = ["container"] + (["tier"] if name in _TIERED else [])
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(name, helps.get(name, name), labels=label_names)
            values = [self.metrics.container]
            if name in _TIERED:
                values.append(extra.get("tier", "memory"))
            family.add_metric(values, float(live[key]))
        yield from families.values()


class _FuseCollector:
    """azregfs_fuse_operations_total and azregfs_fuse_operation_duration_seconds, from the
    plain counts ``Metrics.fuse_done`` keeps (read from the scrape's thread: each
    operation's counts are copied at once, and its total is their sum)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        labels = ["container", "operation"]
        served = CounterMetricFamily("azregfs_fuse_operations", "FUSE requests served",
                                     labels=labels)
        latency = HistogramMetricFamily("azregfs_fuse_operation_duration_seconds",
                                        "FUSE request latency", labels=labels)
        bounds = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
        for op, counts in list(self.metrics.fuse_latency.items()):
            counts = list(counts)
            cumulative, total = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                total += count
                cumulative.append((bound, total))
            served.add_metric([self.metrics.container, op], total)
            latency.add_metric([self.metrics.container, op], cumulative,
                               self.metrics.fuse_seconds[op])
        yield served
        yield latency


class _Labelled:
    """Another collector's metrics with the container label added (the process metrics)."""

    def __init__(self, inner: Any, container: str) -> None:
        self.inner = inner
        self.container = container

    def collect(self) -> Iterable[Metric]:
        for family in self.inner.collect():
            for sample in family.samples:
                sample.labels["container"] = self.container
            yield family


def start_server(metrics: Metrics, address: str) -> Any:
    """Serve /metrics on host:port in prometheus_client's own thread; returns the server."""
    from prometheus_client import disable_created_metrics, start_http_server

    disable_created_metrics()  # the _created series double the output and nobody graphs them
    host, port = parse_address(address)
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server
