"""The fault-injecting proxy (azregfs/faultproxy.py): it passes Azure traffic through
unchanged, counts it by operation, and each fault it injects is seen by the SDK as the
real service's would be. Against the session's Azurite, with the SDK through the proxy.

Timing checks are one-sided only (a delay is at least what was asked), never an upper bound.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, ContainerClient, LinearRetry
from conftest import Mount, mount_through

from azregfs.demo.azurite import Azurite
from testkit.faultproxy import CONTROL, FaultProxy, Rule, classify

MiB = 1024 * 1024
NETWORK_ERRORS = (ServiceRequestError, ServiceResponseError)


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    with FaultProxy(azurite.port, seed=1234) as server:
        yield server


def through(proxy: FaultProxy, container: ContainerClient, **options: Any) -> ContainerClient:
    """The same container, reached through the proxy."""
    return ContainerClient.from_connection_string(
        proxy.connection_string(), container.container_name, **options)


def no_retry(proxy: FaultProxy, container: ContainerClient, **options: Any) -> ContainerClient:
    return through(proxy, container, retry_total=0, **options)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def control(proxy: FaultProxy, method: str, path: str, payload: Any = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(proxy.url + CONTROL + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# -- classification -------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "target", "headers", "op"), [
    ("HEAD", "/acct/c/a/b", {}, "head"),
    ("GET", "/acct/c?restype=container&comp=list&prefix=a/", {}, "list"),
    ("GET", "/acct/c/blob?comp=blocklist&blocklisttype=committed", {}, "get_block_list"),
    ("GET", "/acct/c/blob", {}, "read"),
    ("PUT", "/acct/c/blob?comp=block&blockid=QUFB", {}, "stage_block"),
    ("PUT", "/acct/c/blob?comp=blocklist", {}, "commit_block_list"),
    ("PUT", "/acct/c/blob?comp=metadata", {}, "set_metadata"),
    ("PUT", "/acct/c/blob?comp=appendblock", {}, "append_block"),
    ("PUT", "/acct/c/blob", {"x-ms-copy-source": "http://127.0.0.1/acct/c/a"}, "copy"),
    ("PUT", "/acct/c?restype=container", {}, "create_container"),
    ("PUT", "/acct/c/blob", {"x-ms-blob-type": "BlockBlob"}, "put"),
    ("DELETE", "/acct/c/blob", {}, "delete"),
    ("GET", "/acct/c?restype=container", {}, "container_properties"),
    ("HEAD", "/acct/c?restype=container", {}, "container_properties"),
    ("DELETE", "/acct/c?restype=container", {}, "delete_container"),
    ("PUT", "/acct/c/blob?comp=lease", {}, "put_lease"),
])
def test_classify(method: str, target: str, headers: dict[str, str], op: str) -> None:
    assert classify(method, target, headers) == op


def test_rules_are_validated() -> None:
    with pytest.raises(ValueError):
        Rule("explode")
    with pytest.raises(ValueError):
        Rule("error", p=1.5)
    with pytest.raises(ValueError):
        Rule.from_json({"fault": "latency", "millis": 3})
    assert Rule("error", status=503).code == "ServerBusy"
    assert Rule("error", status=503).retry_after == 1
    assert Rule("error", status=500).code == "InternalError"


def test_refuses_anything_but_loopback() -> None:
    with pytest.raises(ValueError):
        FaultProxy(80, upstream_host="10.1.2.3")
    with pytest.raises(ValueError):
        FaultProxy(80, listen_host="0.0.0.0")


# -- passthrough ----------------------------------------------------------------------------

def test_passthrough_and_counts(proxy: FaultProxy, container: ContainerClient,
                                azurite: Azurite) -> None:
    client = through(proxy, container, max_single_put_size=4 * MiB, max_block_size=4 * MiB,
                     max_single_get_size=32 * MiB)
    rng = random.Random(5)
    small, big = rng.randbytes(100_000), rng.randbytes(10 * MiB + 123)
    proxy.reset_counts()

    client.upload_blob("dir/small", small)
    client.upload_blob("dir/big", big, max_concurrency=1)  # 3 blocks and a commit
    assert sha(client.download_blob("dir/small").readall()) == sha(small)
    assert sha(client.download_blob("dir/big").readall()) == sha(big)
    assert sorted(b.name for b in client.list_blobs()) == ["dir/big", "dir/small"]

    blob = client.get_blob_client("blocks")
    blob.stage_block("YQ==", b"a" * 1000)
    blob.stage_block("Yg==", b"b" * 2000)
    blob.commit_block_list([BlobBlock("YQ=="), BlobBlock("Yg==")])
    committed, _ = blob.get_block_list("committed")
    assert [block.size for block in committed] == [1000, 2000]
    blob.set_blob_metadata({"k": "v"})
    assert blob.get_blob_properties().metadata == {"k": "v"}

    log = client.get_blob_client("log")
    log.create_append_blob()
    log.append_block(b"one,")
    log.append_block(b"two")
    copy = client.get_blob_client("copy")
    copy.start_copy_from_url(client.get_blob_client("dir/small").url)
    client.delete_blob("log")

    assert proxy.counts() == {
        "put": 2,  # dir/small and the append blob's creation
        "stage_block": 3 + 2, "commit_block_list": 2, "read": 2, "list": 1,
        "get_block_list": 1, "set_metadata": 1, "head": 1, "append_block": 2, "copy": 1,
        "delete": 1,
    }
    assert proxy.faults() == {}
    snapshot = proxy.snapshot()
    assert snapshot["bytes_up"] >= len(small) + len(big) + 3000 + 7
    assert snapshot["bytes_down"] >= len(small) + len(big)

    # What went through the proxy is what Azure stores.
    direct = container
    assert sha(direct.download_blob("dir/big").readall()) == sha(big)
    assert direct.download_blob("blocks").readall() == b"a" * 1000 + b"b" * 2000
    assert direct.download_blob("copy").readall() == small
    assert sorted(b.name for b in direct.list_blobs()) == ["blocks", "copy", "dir/big",
                                                           "dir/small"]


def test_a_256_mib_get_streams_through(proxy: FaultProxy, container: ContainerClient) -> None:
    data = os.urandom(256 * MiB)
    container.upload_blob("huge", data, max_concurrency=4)  # directly: only the GET is tested
    client = through(proxy, container, max_single_get_size=256 * MiB)
    proxy.reset_counts()
    digest = hashlib.sha256()
    size = 0
    for chunk in client.download_blob("huge", max_concurrency=1).chunks():
        digest.update(chunk)
        size += len(chunk)
    assert size == len(data)
    assert digest.hexdigest() == sha(data)
    assert proxy.counts() == {"read": 1}  # one response of 256 MiB, relayed piece by piece


def test_control_endpoint(proxy: FaultProxy, container: ContainerClient) -> None:
    client = no_retry(proxy, container)
    proxy.reset_counts()
    client.upload_blob("a", b"x")
    client.get_blob_client("a").get_blob_properties()
    counts = control(proxy, "GET", "/counts")
    assert counts["requests"] == {"put": 1, "head": 1}
    assert counts["faults"] == {}

    added = control(proxy, "POST", "/rules", {"fault": "error", "op": "head", "status": 500,
                                              "code": "OperationTimedOut"})
    assert [rule["code"] for rule in added] == ["OperationTimedOut"]
    with pytest.raises(HttpResponseError) as caught:
        client.get_blob_client("a").get_blob_properties()
    assert caught.value.status_code == 500
    rules = control(proxy, "GET", "/rules")
    assert [(rule["fault"], rule["fired"]) for rule in rules] == [("error", 1)]

    control(proxy, "PUT", "/rules", [{"fault": "latency", "ms": 1},
                                     {"fault": "reset_request", "op": "read", "p": 0.5}])
    assert [rule.fault for rule in proxy.rules()] == ["latency", "reset_request"]
    control(proxy, "DELETE", f"/rules/{proxy.rules()[1].id}")
    assert [rule.fault for rule in proxy.rules()] == ["latency"]
    control(proxy, "DELETE", "/rules")
    assert proxy.rules() == []

    assert control(proxy, "POST", "/outage", {"on": True}) == {"on": True}
    with pytest.raises(NETWORK_ERRORS):
        client.get_blob_client("a").get_blob_properties()
    assert control(proxy, "GET", "/outage") == {"on": True}  # control works in an outage
    control(proxy, "POST", "/outage", {"on": False})
    client.get_blob_client("a").get_blob_properties()

    assert control(proxy, "POST", "/seed", {"seed": 3}) == {"seed": 3}
    state = control(proxy, "GET", "/")
    assert state["upstream"].endswith(f":{proxy.upstream_port}")
    old = control(proxy, "POST", "/counts/reset")
    assert old["requests"]["head"] == 4
    assert old["faults"] == {"error:head": 1, "outage:head": 1}
    assert control(proxy, "GET", "/counts")["requests"] == {}

    for method, path, payload, status in [("POST", "/rules", {"fault": "nope"}, 400),
                                          ("POST", "/outage", {}, 400),
                                          ("GET", "/nothing", None, 404),
                                          ("DELETE", "/rules/999", None, 404)]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            control(proxy, method, path, payload)
        assert refused.value.code == status


# -- faults ---------------------------------------------------------------------------------

def test_503_server_busy(proxy: FaultProxy, container: ContainerClient) -> None:
    client = no_retry(proxy, container)
    proxy.add_rule("error", op="put", status=503, retry_after=2)
    with pytest.raises(HttpResponseError) as caught:
        client.upload_blob("a", b"data")
    error = caught.value
    assert error.status_code == 503
    assert error.error_code == "ServerBusy"
    headers = error.response.headers
    assert headers["Retry-After"] == "2"
    assert headers["x-ms-error-code"] == "ServerBusy"
    assert headers["x-ms-request-id"]
    assert "<Code>ServerBusy</Code>" in error.response.text()
    with pytest.raises(ResourceNotFoundError):  # never forwarded
        container.get_blob_client("a").get_blob_properties()
    assert proxy.faults() == {"error:put": 1}
    client.get_container_properties()  # other operations pass, on the same connection


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"),
                                              (500, "OperationTimedOut"),
                                              (408, None)])
def test_other_errors(proxy: FaultProxy, container: ContainerClient, status: int,
                      code: str | None) -> None:
    container.upload_blob("a", b"data")
    client = no_retry(proxy, container)
    proxy.add_rule("error", op="read", status=status, code=code)
    with pytest.raises(HttpResponseError) as caught:
        client.download_blob("a").readall()
    assert caught.value.status_code == status
    assert caught.value.error_code == (code or "RequestTimeout")
    # A HEAD gets the status and headers without a body, as HTTP wants.
    proxy.add_rule("error", op="head", status=status, code=code)
    with pytest.raises(HttpResponseError) as head:
        client.get_blob_client("a").get_blob_properties()
    assert head.value.status_code == status


def test_retries_get_through_a_rule_that_fires_once(proxy: FaultProxy,
                                                    container: ContainerClient) -> None:
    client = through(proxy, container, retry_policy=LinearRetry(backoff=0, random_jitter_range=0,
                                                                retry_total=2))
    proxy.add_rule("error", op="put", status=503, times=1)
    proxy.reset_counts()
    client.upload_blob("a", b"data")
    assert container.download_blob("a").readall() == b"data"
    assert proxy.counts() == {"put": 2}
    assert proxy.faults() == {"error:put": 1}


def test_reset_before_forwarding(proxy: FaultProxy, container: ContainerClient) -> None:
    client = no_retry(proxy, container)
    proxy.add_rule("reset_request", op="put")
    with pytest.raises(NETWORK_ERRORS):
        client.upload_blob("a", b"data")
    with pytest.raises(ResourceNotFoundError):  # Azure never saw it
        container.get_blob_client("a").get_blob_properties()


def test_reset_after_forwarding(proxy: FaultProxy, container: ContainerClient) -> None:
    client = no_retry(proxy, container)
    proxy.add_rule("reset_response", op="put")
    with pytest.raises(NETWORK_ERRORS):
        client.upload_blob("a", b"data")
    # The response was lost, not the request: the blob is there.
    assert container.download_blob("a").readall() == b"data"


def test_reset_mid_body(proxy: FaultProxy, container: ContainerClient) -> None:
    data = os.urandom(2 * MiB)
    container.upload_blob("a", data)
    client = no_retry(proxy, container)
    proxy.add_rule("reset_response", op="read", after_bytes=100_000)
    with pytest.raises(AzureError):
        client.download_blob("a").readall()
    assert proxy.faults()["reset_response:read"] >= 1
    proxy.clear_rules()
    assert client.download_blob("a").readall() == data


def test_cut_body(proxy: FaultProxy, container: ContainerClient) -> None:
    data = os.urandom(1 * MiB)
    container.upload_blob("a", data)
    client = no_retry(proxy, container)
    # Every attempt, the SDK's own retries of a short read included.
    with proxy.rule("truncate", op="read"), pytest.raises(AzureError):
        client.download_blob("a").readall()
    assert proxy.faults()["truncate:read"] >= 1
    assert client.download_blob("a").readall() == data

    # On the wire: the Content-Length of the whole blob, then fewer bytes and a close.
    container.set_container_access_policy({}, public_access="blob")
    proxy.add_rule("truncate", op="read", after_bytes=12345)
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("GET", f"/devstoreaccount1/{container.container_name}/a")
    response = connection.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length")) == len(data)
    with pytest.raises(http.client.IncompleteRead) as short:
        response.read()
    assert short.value.partial == data[:12345]
    connection.close()


def test_stall(proxy: FaultProxy, container: ContainerClient) -> None:
    container.upload_blob("a", os.urandom(MiB))
    client = no_retry(proxy, container, read_timeout=0.5)
    proxy.add_rule("stall", op="head", seconds=5)
    with pytest.raises(NETWORK_ERRORS):
        client.get_blob_client("a").get_blob_properties()
    proxy.add_rule("stall", op="read", seconds=5, after_bytes=1000)
    with pytest.raises(AzureError):
        client.download_blob("a").readall()
    assert proxy.faults().get("stall:read", 0) >= 1


def test_latency(proxy: FaultProxy, container: ContainerClient) -> None:
    container.upload_blob("a", b"data")
    client = no_retry(proxy, container)
    client.get_blob_client("a").get_blob_properties()  # the connection is open already
    proxy.add_rule("latency", op="head", ms=300)
    proxy.add_rule("latency", op="read", ms=100)
    started = time.monotonic()
    client.get_blob_client("a").get_blob_properties()
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert client.download_blob("a").readall() == b"data"
    assert time.monotonic() - started >= 0.1
    assert proxy.faults() == {}  # latency is not a fault


def test_outage(proxy: FaultProxy, container: ContainerClient) -> None:
    container.upload_blob("a", b"data")
    client = no_retry(proxy, container)
    proxy.set_outage(True)
    for call in (lambda: client.get_blob_client("a").get_blob_properties(),
                 lambda: client.upload_blob("b", b"x"),
                 lambda: list(client.list_blobs())):
        with pytest.raises(NETWORK_ERRORS):
            call()
    proxy.set_outage(False)
    assert client.download_blob("a").readall() == b"data"
    assert sorted(b.name for b in container.list_blobs()) == ["a"]


def test_probability_follows_the_seed(proxy: FaultProxy, container: ContainerClient) -> None:
    container.upload_blob("a", b"data")
    client = no_retry(proxy, container)

    def pattern() -> list[bool]:
        failed = []
        for _ in range(40):
            try:
                client.get_blob_client("a").get_blob_properties()
                failed.append(False)
            except HttpResponseError:
                failed.append(True)
        return failed

    proxy.add_rule("error", op="head", p=0.5)
    proxy.seed(77)
    first = pattern()
    proxy.seed(77)
    assert pattern() == first
    assert 0 < sum(first) < len(first)


def test_command_line(azurite: Azurite, container: ContainerClient) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "testkit.faultproxy", "--upstream",
         f"http://127.0.0.1:{azurite.port}", "--latency", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())  # type: ignore[union-attr]
        remote = FaultProxy(azurite.port)  # only to build its URLs
        remote.listen_port = port
        client = through(remote, container)
        client.upload_blob("a", b"data")
        assert control(remote, "GET", "/counts")["requests"] == {"put": 1}
        assert [rule["ms"] for rule in control(remote, "GET", "/rules")] == [1]
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0
    refused = subprocess.run([sys.executable, "-m", "testkit.faultproxy", "--upstream",
                              "http://192.0.2.1:80"], capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode == 2
    assert "loopback" in refused.stderr


# -- a mount through the proxy --------------------------------------------------------------

def test_mount_through_the_proxy(proxy: FaultProxy, azurite: Azurite, mount_factory,
                                 container: ContainerClient) -> None:
    mnt: Mount = mount_through(proxy, azurite, mount_factory, container)
    assert proxy.counts().get("container_properties", 0) >= 1  # the pre-flight went through
    data = os.urandom(3 * MiB + 17)
    # One throttled write: the daemon's retries carry the file through.
    proxy.add_rule("error", op=["put", "commit_block_list"], status=503, times=1,
                   retry_after=0)
    (mnt.path / "dir").mkdir()
    (mnt.path / "dir" / "file").write_bytes(data)
    assert container.download_blob("dir/file").readall() == data
    assert proxy.faults() == {"error:put": 1} or proxy.faults() == {"error:commit_block_list": 1}
    assert (mnt.path / "dir" / "file").read_bytes() == data
    counts = proxy.counts()
    assert counts.get("put", 0) + counts.get("stage_block", 0) >= 1
