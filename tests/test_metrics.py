"""Operators' instruments: the Prometheus endpoint (scraped by a real Prometheus), `azregfs
stats`, `azregfs check`, `--version`, JSON and journald logs, and the request log."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, azregfs_command, need
from registry_util import wait_for

from azregfs.demo.azurite import Azurite, free_port, stop_process
from azregfs.demo.oci import MiB, Registry, build_image, read_image, skopeo_copy
from azregfs.ops.metrics import classify, healthy, status_class
from azregfs.ops.monitor import rates

# -- pure ----------------------------------------------------------------------------------

BASE = "http://127.0.0.1:10000/devstoreaccount1/c"


@pytest.mark.parametrize(("method", "url", "headers", "expected"), [
    ("HEAD", f"{BASE}/a/b", {}, "head"),
    ("GET", f"{BASE}?restype=container&comp=list&prefix=a%2F&delimiter=%2F", {}, "list"),
    ("GET", f"{BASE}/a?comp=blocklist&blocklisttype=committed", {}, "get_block_list"),
    ("GET", f"{BASE}/a", {"x-ms-range": "bytes=0-9"}, "read"),
    ("PUT", f"{BASE}/a?comp=block&blockid=QUJD", {}, "stage_block"),
    ("PUT", f"{BASE}/a?comp=blocklist", {}, "commit_block_list"),
    ("PUT", f"{BASE}/a?comp=metadata", {}, "set_metadata"),
    ("PUT", f"{BASE}/a?comp=appendblock", {}, "append_block"),
    ("PUT", f"{BASE}/b", {"x-ms-copy-source": f"{BASE}/a"}, "copy"),
    ("PUT", f"{BASE}/a", {"x-ms-blob-type": "BlockBlob"}, "put"),
    ("PUT", f"{BASE}?restype=container", {}, "create_container"),
    ("GET", f"{BASE}?restype=container", {}, "container_properties"),
    ("DELETE", f"{BASE}/a", {}, "delete"),
])
def test_requests_are_named_by_azure_operation(method, url, headers, expected) -> None:
    assert classify(method, url, headers) == expected


def test_outcomes() -> None:
    assert [status_class(s) for s in (200, 404, 503, None)] == ["2xx", "4xx", "5xx", "none"]
    assert healthy(200) and healthy(404) and healthy(409)
    assert not any(healthy(s) for s in (None, 403, 408, 500, 503))


def test_rates_per_interval() -> None:
    def snap(reads: int, up: int, hits: int, misses: int) -> dict:
        return {"driver": {"requests": {"read": reads, "put": 1}, "bytes_up": up,
                           "bytes_down": 0, "retries": 0, "throttled": 0},
                "cache": {"hits": hits, "misses": misses}, "dirty_bytes": 2 * MiB,
                "writer_wait_seconds": 0.5}

    figures = rates(snap(10, 0, 0, 0), snap(30, 4 * MiB, 3, 1), 2.0)
    assert figures["requests_per_second"] == {"read": 10.0}
    assert figures["up_mib_per_second"] == 2.0
    assert figures["cache_hit_ratio"] == 0.75
    assert figures["dirty_mib"] == 2.0


# -- through a mount -----------------------------------------------------------------------

def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label pairs: value} of one metric in the exposition text."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1))))
            found[labels] = float(match.group(2))
    return found


def by_operation(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples(text, "azregfs_azure_requests_total").items():
        op = dict(labels)["operation"]
        totals[op] = totals.get(op, 0) + value
    return totals


def azregfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*azregfs_command(), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_endpoint_matches_the_daemons_counters(mount_factory, container) -> None:
    need("promtool")
    port = free_port()
    mnt: Mount = mount_factory(container.container_name, "--metrics-addr", f"127.0.0.1:{port}")
    (mnt.path / "d").mkdir()
    payload = os.urandom(3 * MiB)
    (mnt.path / "d" / "f").write_bytes(payload)
    assert (mnt.path / "d" / "f").read_bytes() == payload
    with pytest.raises(FileNotFoundError):
        (mnt.path / "missing").stat()
    text = metrics_text(port)
    stats = mnt.stats()
    assert by_operation(text) == stats["driver"]["requests"]
    up = samples(text, "azregfs_azure_data_bytes_total")
    assert up[(("container", container.container_name), ("direction", "up"))] == len(payload)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("azregfs_azure_request_duration_seconds_bucket", "azregfs_fuse_operations_total",
                 "azregfs_fuse_operation_duration_seconds_bucket", "azregfs_fuse_errors_total",
                 "azregfs_cache_hits_total", "azregfs_cache_misses_total",
                 "azregfs_cache_evictions_total", "azregfs_cache_bytes", "azregfs_dirty_bytes",
                 "azregfs_dirty_budget_bytes", "azregfs_writer_wait_seconds_total",
                 "azregfs_open_handles", "azregfs_write_sessions", "azregfs_commits_total",
                 "azregfs_commit_failures_total", "azregfs_inodes",
                 "process_resident_memory_bytes"):
        found = samples(text, name)
        assert found, f"{name} missing"
        assert all(dict(labels).get("container") == container.container_name
                   for labels in found), name
    errors = samples(text, "azregfs_fuse_errors_total")
    assert any(dict(labels) == {"container": container.container_name, "operation": "lookup",
                                "errno": "ENOENT"} for labels in errors)
    tiers = {dict(labels)["tier"] for labels in samples(text, "azregfs_cache_hits_total")}
    assert tiers == {"memory", "disk"}
    assert "/d/f" not in text  # never a blob name in a label


def test_busy_metrics_port_costs_the_metrics_not_the_mount(mount_factory, container) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mnt = mount_factory(container.container_name, "--metrics-addr", f"127.0.0.1:{port}")
        (mnt.path / "f").write_bytes(b"still works")
        assert (mnt.path / "f").read_bytes() == b"still works"
    assert re.search(r"ERROR .*metrics_addr 127\.0\.0\.1:\d+: cannot listen", mnt.log())


class Prometheus:
    """Debian's prometheus on loopback, scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: azregfs\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def query(self, expression: str) -> list[dict]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expression}))
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, expression: str, label: str) -> dict[str, float]:
        try:
            return {item["metric"].get(label, ""): float(item["value"][1])
                    for item in self.query(expression)}
        except OSError:
            return {}

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator:
    need("prometheus")
    started: list[Prometheus] = []

    def make(target: str) -> Prometheus:
        server = Prometheus(tmp_path / "prometheus", target)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.mark.registry
def test_prometheus_sees_what_the_daemon_did(mount_factory, container, prometheus_factory,
                                             tmp_path: Path) -> None:
    """A registry push and reads through the cache, scraped by a real Prometheus: its
    request counts equal the daemon's, and its byte counts the bytes really moved."""
    need("docker-registry")
    need("skopeo")
    port = free_port()
    mnt = mount_factory(container.container_name, "--metrics-addr", f"127.0.0.1:{port}")
    prometheus = prometheus_factory(f"127.0.0.1:{port}")
    selector = f'{{container="{container.container_name}"}}'
    image = build_image(tmp_path / "image", [3 * MiB, 64 * 1024], tag="v1", seed=10,
                        compress_below=1 * MiB)
    registry = Registry(mnt.path, tmp_path / "registry").start()
    try:
        skopeo_copy(f"oci:{image.layout}:{image.tag}",
                    f"docker://{registry.address}/metrics/test:v1")
        pulled = tmp_path / "pulled"
        skopeo_copy(f"docker://{registry.address}/metrics/test:v1", f"oci:{pulled}:v1")
        assert read_image(pulled, "v1").digests == image.digests
    finally:
        registry.stop()

    # Bytes really moved: a file written, and a blob another client wrote read twice (the
    # second time from the cache).
    before = mnt.stats()["driver"]
    written = os.urandom(20 * MiB)
    (mnt.path / "written").write_bytes(written)
    other = os.urandom(10 * MiB)
    container.upload_blob("from-sdk", other)
    for _ in range(2):
        assert hashlib.sha256((mnt.path / "from-sdk").read_bytes()).digest() == \
            hashlib.sha256(other).digest()
    stats = mnt.stats()
    assert stats["driver"]["bytes_up"] - before["bytes_up"] == len(written)
    assert stats["driver"]["bytes_down"] - before["bytes_down"] == len(other)
    assert stats["cache"]["hits"] > 0

    expected = stats["driver"]["requests"]
    assert expected.get("stage_block") and expected.get("list") and expected.get("read")

    def converged() -> bool:
        # The daemon's own counters, read each time: a deferred directory marker may still
        # be written (marker_delay) after the workload.
        nonlocal stats
        stats = mnt.stats()
        seen = prometheus.values(
            f"sum by (operation) (azregfs_azure_requests_total{selector})", "operation")
        return seen == {op: float(count) for op, count in stats["driver"]["requests"].items()}

    wait_for(converged, 60, "Prometheus to report the daemon's request counts", interval=0.5)
    moved = prometheus.values(f"azregfs_azure_data_bytes_total{selector}", "direction")
    assert moved == {"up": float(stats["driver"]["bytes_up"]),
                     "down": float(stats["driver"]["bytes_down"])}
    hits = prometheus.values(f"azregfs_cache_hits_total{selector}", "tier")
    assert hits == {"memory": stats["cache"]["memory_hits"], "disk": 0}
    assert hits["memory"] > 0
    commits = prometheus.values(f"azregfs_commits_total{selector}", "container")
    assert commits[container.container_name] == stats["commits"] > 0
    # Every query of the docs and of the Grafana dashboard is one Prometheus accepts (some
    # rightly find nothing here: throttling, failures).
    for expression in documented_queries():
        prometheus.query(expression)
    wait_for(lambda: prometheus.query("sum(rate(azregfs_azure_requests_total[1m]))"), 30,
             "two scrapes, for rate()", interval=0.5)


def documented_queries() -> list[str]:
    docs = Path(__file__).parent.parent / "docs"
    text = (docs / "operations.md").read_text()
    queries = []
    for block in re.findall(r"```promql\n(.*?)```", text, re.DOTALL):
        # One query per paragraph; a query may continue over indented lines.
        queries += [" ".join(q.split()) for q in re.split(r"\n(?=\S)", block.strip())]
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        queries += [target["expr"] for target in panel["targets"]]
    return [q.replace("$container", ".*").replace("$__rate_interval", "1m") for q in queries]


def test_stats_json_and_watch(mnt) -> None:
    (mnt.path / "f").write_bytes(b"x" * 1000)
    result = azregfs("stats", "--json", str(mnt.path))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["driver"]["requests"]["put"] >= 1
    assert stats["commits"] >= 1 and stats["commit_failures"] == 0
    assert stats["container"] == mnt.args[-2]
    table = azregfs("stats", str(mnt.path))
    assert table.returncode == 0 and "Azure put" in table.stdout and "dirty MiB" in table.stdout
    watcher = subprocess.Popen([*azregfs_command(), "stats", "--json", "--watch", "0.5",
                                "--count", "2", str(mnt.path)], stdout=subprocess.PIPE,
                               text=True)
    for index in range(20):
        (mnt.path / f"g{index}").write_bytes(b"y")
        time.sleep(0.05)
    out, _ = watcher.communicate(timeout=30)
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    assert sum(line["requests_per_second"].get("put", 0) for line in lines) > 0
    assert {"up_mib_per_second", "down_mib_per_second", "cache_hit_ratio",
            "dirty_mib"} <= lines[0].keys()


def test_stats_of_something_else(tmp_path: Path) -> None:
    result = azregfs("stats", str(tmp_path))
    assert result.returncode == 1 and "is not mounted" in result.stdout + result.stderr


def test_check_takes_the_mountpoint_from_the_config_file(mnt, tmp_path: Path) -> None:
    """As the systemd unit names a mount: by its /etc/azregfs/NAME.yml."""
    config = tmp_path / "instance.yml"
    config.write_text(f"container: whatever\nmountpoint: {mnt.path}\n")
    result = azregfs("check", "--config", str(config))
    assert result.returncode == 0 and result.stdout.startswith("OK: "), result.stdout
    assert azregfs("stats", "--json", "-c", str(config)).returncode == 0
    assert azregfs("check").returncode == 3  # UNKNOWN: no mountpoint at all


def test_check_ok_then_critical_when_azure_is_gone(container_name: str, tmp_path: Path) -> None:
    """Its own Azurite, stopped halfway: check must notice, even on an idle mount."""
    from conftest import start_mount

    server = Azurite().start()
    mount = None
    try:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(server.connection_string).create_container(
            container_name)
        mount = start_mount(server, container_name, tmp_path / "mnt", "-o", "retries=0,timeout=5")
        result = azregfs("check", str(mount.path))
        assert result.returncode == 0, result.stdout
        assert re.match(r"OK: .* daemon answers, last Azure request [\d.]+ s ago succeeded",
                        result.stdout), result.stdout
        assert len(result.stdout.strip().splitlines()) == 1
        server.stop()
        result = azregfs("check", str(mount.path))
        assert result.returncode == 2, result.stdout
        assert result.stdout.startswith("CRITICAL: ") and "FAILED" in result.stdout
        assert azregfs("check", "--no-probe", str(mount.path)).returncode == 2
    finally:
        if mount is not None:
            mount.unmount()
        server.stop()
    result = azregfs("check", str(tmp_path / "mnt"))
    assert result.returncode == 2 and "not mounted" in result.stdout


def test_check_warns_after_a_failed_commit(azurite: Azurite, mount_factory, container) -> None:
    """A read-only SAS: the commit fails (EACCES at close), and check says so."""
    from azure.storage.blob import ContainerSasPermissions
    from test_namespace import sas_mount_env

    env = sas_mount_env(azurite, container, ContainerSasPermissions(read=True, list=True))
    mnt = mount_factory(container.container_name, env=env)
    with pytest.raises(PermissionError), open(mnt.path / "f", "wb") as handle:
        handle.write(b"refused")
    result = azregfs("check", str(mnt.path))
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith("WARNING: ") and "1 failed commit " in result.stdout


def test_version() -> None:
    result = azregfs("--version")
    assert result.returncode == 0
    assert re.match(r"azregfs \S+ \(pyfuse3 \S+, libfuse 3\.\d+[\d.]*, trio \S+, "
                    r"azure-storage-blob \S+, Python \S+\)$", result.stdout.strip()), result.stdout


def test_daemon_logs_its_versions_and_each_request_with_its_fuse_operation(mnt) -> None:
    (mnt.path / "f").write_bytes(b"data")
    log = mnt.log()
    assert re.search(r"INFO azregfs\.daemon: azregfs \S+ \(pyfuse3 ", log)
    assert re.search(r"DEBUG azregfs\.ops\.metrics: azure put /\S+/f -> 201 [\d.]+ ms "
                     r"\[fuse (flush|release)\]", log), log[-3000:]


def test_json_log_format(mount_factory, container, tmp_path: Path) -> None:
    log_file = tmp_path / "daemon.json.log"
    mnt = mount_factory(container.container_name, "--log-format", "json",
                        "--log-file", str(log_file))
    (mnt.path / "f").write_bytes(b"data")
    mnt.unmount()
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any("mounted container" in e["message"] for e in entries)
    assert any(e["level"] == "DEBUG" and e["message"].startswith("azure put") for e in entries)


def test_journal_lines_carry_their_priority(tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM names stderr) each line starts with <priority>."""
    script = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from azregfs.config import Config\n"
        "from azregfs.ops.logs import setup_logging\n"
        "for fmt in ('text', 'json'):\n"
        "    setup_logging(Config(log_format=fmt, log_level='DEBUG'), foreground=True)\n"
        "    logging.getLogger('azregfs.x').error('bad %s', fmt)\n"
        "    logging.getLogger('azregfs.x').info('fine')\n")
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as handle:
        subprocess.run([sys.executable, "-c", script], stderr=handle, check=True)
    lines = stderr.read_text().splitlines()
    assert lines[0] == "<3>ERROR azregfs.x: bad text"
    assert lines[1] == "<6>INFO azregfs.x: fine"
    assert lines[2].startswith("<3>{") and json.loads(lines[2][3:])["message"] == "bad json"


def test_unit_example_config_sets_the_metrics_address() -> None:
    text = (Path(__file__).parent.parent / "systemd" / "registry.yml.example").read_text()
    assert re.search(r"^metrics_addr: 127\.0\.0\.1:9469$", text, re.MULTILINE)
