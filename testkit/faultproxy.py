"""A loopback HTTP proxy in front of Azurite that counts requests by Azure operation and
injects faults: latency, throttling and server errors, connection resets, stalls and
responses cut short. A development and test tool beside ``azurite.py``; the daemon never
imports it.

    python -m testkit.faultproxy --upstream http://127.0.0.1:10000 [--listen 127.0.0.1:0]

prints the port it listens on, then serves until SIGINT/SIGTERM. In Python::

    with FaultProxy(azurite.port, seed=1) as proxy:
        conn = proxy.connection_string(azurite)    # BlobEndpoint through the proxy
        proxy.add_rule("error", op="stage_block", p=0.1, status=503)
        ...
        proxy.counts()                             # {"stage_block": 12, "read": 40, ...}

Why a small proxy of our own rather than mitmproxy scripting: the clients under test speak
plain HTTP/1.1 keep-alive to Azurite's path-style URLs on loopback, so the proxy needs no
TLS, HTTP/2 or host routing, only request framing, which the standard library's
``http.server`` and ``http.client`` provide. Owning the sockets is what the faults need:
a reset is a close with ``SO_LINGER`` 0 at an exact point, a short body is a chosen number
of bytes then FIN, and a 256 MiB download is relayed in 256 KiB pieces without ever being
held in memory (mitmproxy buffers whole bodies unless streaming is switched on per flow,
and streamed flows can no longer be cut at a byte offset from a script). It starts in
milliseconds inside the test process, has no dependency beyond the standard library, and
its state (rules, counts) is plain Python shared with the test, with no IPC. mitmproxy
would add a large dependency tree and a second process per test for nothing these tests use.

Design:

- One thread per client connection (``socketserver.ThreadingMixIn``), each with its own
  keep-alive connection to the upstream, so the client's connection pooling and
  concurrency pass through unchanged. At most ``max_connections`` connections at once;
  past that a connection is closed at once.
- Bounded in time: an idle client connection is closed after ``idle_timeout`` seconds, an
  upstream that does not answer within ``upstream_timeout`` seconds gets its client reset,
  a stall lasts at most ``MAX_STALL`` seconds, and ``stop()`` ends every wait at once.
- Loopback only: it listens on a loopback address, forwards to a loopback upstream, and
  serves loopback peers only.
- Request bodies up to ``MAX_BUFFERED`` are read whole before forwarding (so a request on
  an upstream connection that Azurite closed while idle is retried once on a fresh one,
  which no client would see); larger ones are streamed. Response bodies are always
  streamed. When the client goes away or a fault cuts a response, the rest of the upstream
  body is still read to its end: Azurite leaks a file descriptor for every response
  abandoned early (see /work/shared/FACTS.md).

Requests are classified by Azure operation (``metrics.classify``: the daemon's own names)
and counted; a fault that fires is counted under ``faults()`` as ``"kind:op"``. Rules are
checked in order for each request: every matching latency rule adds its delay, and the first
other rule that fires decides the request's fate. Every random choice comes from one seedable RNG.

Control API, on the proxy's own port (paths under ``/__faultproxy__``, never counted,
never faulted, served during an outage), JSON in and out:

    GET    /__faultproxy__/counts           {"requests": {op: n}, "faults": {...},
                                             "bytes_up": n, "bytes_down": n}
    POST   /__faultproxy__/counts/reset     zero the counters (answers the old ones)
    GET    /__faultproxy__/rules            the rules, in order, with ids and fired counts
    POST   /__faultproxy__/rules            add a rule (object) or rules (list)
    PUT    /__faultproxy__/rules            replace every rule with a list
    DELETE /__faultproxy__/rules[/ID]       remove every rule, or one
    POST   /__faultproxy__/outage           {"on": true|false}
    POST   /__faultproxy__/seed             {"seed": 42}
    GET    /__faultproxy__/                 the whole state

A rule is ``{"fault": KIND, "op": "*" | OP | [OP, ...], "p": 1.0, "times": null, ...}``
(``times``: fire at most that many times) with, by kind:

- ``latency`` ``ms``: delay the request before forwarding it;
- ``error`` ``status`` (503, 500, 408, ...), ``code`` (default by status: 503 ServerBusy,
  500 InternalError, 408 RequestTimeout; OperationTimedOut is a 500 too), ``retry_after``
  (seconds; 503 defaults to 1): answer Azure's XML error without forwarding;
- ``reset_request``: reset the connection before forwarding (Azure never sees it);
- ``reset_response`` ``after_bytes``: forward, then reset after that many body bytes
  (default half the body; a response without a body is reset before its status line, so
  the operation happened but the client cannot know);
- ``truncate`` ``after_bytes``: forward, send that many body bytes (default half) of a
  longer Content-Length, then close (a response without a body passes unchanged);
- ``stall`` ``seconds`` [``after_bytes``]: hold the request that long without answering
  (or, with ``after_bytes``, forward it and hold the response after that many body
  bytes), then reset the connection.

The ``outage`` switch resets every connection as soon as a request arrives on it, until
it is switched off.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import logging
import random
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from azregfs.demo.azurite import DEV_ACCOUNT, DEV_KEY
from azregfs.ops.metrics import classify

log = logging.getLogger(__name__)

CONTROL = "/__faultproxy__"
CHUNK = 256 * 1024
MAX_BUFFERED = 64 * 1024 * 1024  # request bodies up to this are read whole, then forwarded
MAX_CONTROL_BODY = 1024 * 1024
MAX_STALL = 600.0
MAX_LATENCY_MS = 60_000.0
SLOW = 10.0  # seconds: an upstream answer slower than this is logged as a warning

FAULT_KINDS = ("latency", "error", "reset_request", "reset_response", "truncate", "stall")
DEFAULT_CODES = {503: "ServerBusy", 500: "InternalError", 408: "RequestTimeout"}
MESSAGES = {
    "ServerBusy": "The server is busy.",
    "InternalError": "The server encountered an internal error. Please retry the request.",
    "OperationTimedOut": "The operation could not be completed within the permitted time.",
    "RequestTimeout": "The request timed out.",
}
# Headers of one hop (RFC 9110 7.6.1), not forwarded; framing is redone on each side.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length",
})


# -- rules ----------------------------------------------------------------------------------

@dataclass
class Rule:
    """One fault, for requests whose operation matches `op`, with probability `p`."""

    fault: str
    op: str | list[str] = "*"
    p: float = 1.0
    times: int | None = None  # fire at most this many times (None: no limit)
    ms: float = 0.0  # latency
    status: int = 503  # error
    code: str | None = None  # error; default from the status
    retry_after: float | None = None  # error; 503 defaults to 1 s
    after_bytes: int | None = None  # reset_response, truncate, stall (mid-body)
    seconds: float = 0.0  # stall
    id: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULT_KINDS)}")
        if isinstance(self.op, (list, tuple)):
            self.op = [str(op) for op in self.op]
        elif not isinstance(self.op, str):
            raise ValueError("op must be an operation name, '*' or a list of names")
        self.p = float(self.p)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError("p must be between 0 and 1")
        if self.times is not None and int(self.times) < 0:
            raise ValueError("times must be >= 0")
        if not 0.0 <= float(self.ms) <= MAX_LATENCY_MS:
            raise ValueError(f"ms must be between 0 and {MAX_LATENCY_MS:.0f}")
        if not 0.0 <= float(self.seconds) <= MAX_STALL:
            raise ValueError(f"seconds must be between 0 and {MAX_STALL:.0f}")
        if not 400 <= int(self.status) <= 599:
            raise ValueError("status must be a 4xx or 5xx code")
        if self.after_bytes is not None and int(self.after_bytes) < 0:
            raise ValueError("after_bytes must be >= 0")
        if self.code is None and self.fault == "error":
            self.code = DEFAULT_CODES.get(int(self.status), "InternalError")
        if self.retry_after is None and self.fault == "error" and int(self.status) == 503:
            self.retry_after = 1

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rule:
        if not isinstance(data, dict):
            raise ValueError("a rule is a JSON object")
        known = {f.name for f in fields(cls)} - {"id", "fired"}
        unknown = set(data) - known - {"id", "fired"}
        if unknown:
            raise ValueError(f"unknown rule keys: {', '.join(sorted(unknown))}")
        return cls(**{key: value for key, value in data.items() if key in known})

    def matches(self, op: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if isinstance(self.op, list):
            return op in self.op or "*" in self.op
        return self.op in ("*", op)


@dataclass
class Plan:
    """What happens to one request."""

    delay: float = 0.0  # seconds
    fault: Rule | None = None


# -- the proxy ------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FaultProxy:
    """A loopback proxy to ``127.0.0.1:upstream_port`` with runtime fault rules."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1",
                 listen_host: str = "127.0.0.1", listen_port: int = 0, seed: int | None = None,
                 max_connections: int = 256, idle_timeout: float = 120.0,
                 upstream_timeout: float = 300.0) -> None:
        if not (_is_loopback(upstream_host) and _is_loopback(listen_host)):
            raise ValueError("faultproxy only listens on and forwards to loopback addresses")
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.listen_host = listen_host
        self.listen_port = int(listen_port)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: list[Rule] = []
        self._next_id = 1
        self._requests: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._bytes = {"up": 0, "down": 0}
        self._outage = False
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()

    # -- life cycle

    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self, (self.listen_host, self.listen_port))
        self.listen_port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.1}, name=f"faultproxy-{self.listen_port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            live = list(self._sockets)
        for sock in live:  # wake every handler blocked on a read
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The development account's blob endpoint, through the proxy."""
        return f"{self.url}/{DEV_ACCOUNT}"

    def connection_string(self, azurite: Any = None, account: str = DEV_ACCOUNT,
                          key: str = DEV_KEY) -> str:
        """A connection string for Azurite's development account whose BlobEndpoint is the
        proxy (pass the Azurite to check that the proxy points at it)."""
        if azurite is not None and getattr(azurite, "port", self.upstream_port) != \
                self.upstream_port:
            raise ValueError(f"this proxy forwards to port {self.upstream_port}, "
                             f"not to Azurite's {azurite.port}")
        return (f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
                f"BlobEndpoint={self.url}/{account};")

    # -- rules and switches

    def add_rule(self, fault: str | Rule, op: str | list[str] = "*", p: float = 1.0,
                 **params: Any) -> Rule:
        """Append a rule (see the module docstring) and return it, with its id."""
        rule = fault if isinstance(fault, Rule) else Rule(fault=fault, op=op, p=p, **params)
        with self._lock:
            rule.id = self._next_id
            rule.fired = 0
            self._next_id += 1
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule | int) -> bool:
        rule_id = rule.id if isinstance(rule, Rule) else int(rule)
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear_rules(self) -> None:
        with self._lock:
            self._rules = []

    def set_rules(self, rules: Iterable[Rule | dict[str, Any]]) -> list[Rule]:
        parsed = [r if isinstance(r, Rule) else Rule.from_json(r) for r in rules]
        self.clear_rules()
        return [self.add_rule(rule) for rule in parsed]

    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @contextlib.contextmanager
    def rule(self, fault: str, op: str | list[str] = "*", p: float = 1.0,
             **params: Any) -> Iterator[Rule]:
        """A rule for the duration of a ``with`` block."""
        added = self.add_rule(fault, op, p, **params)
        try:
            yield added
        finally:
            self.remove_rule(added)

    def set_outage(self, on: bool) -> None:
        with self._lock:
            self._outage = bool(on)

    @property
    def outage(self) -> bool:
        return self._outage

    def seed(self, seed: int | None) -> None:
        with self._lock:
            self._rng.seed(seed)

    # -- counters

    def counts(self) -> dict[str, int]:
        """Requests forwarded or faulted, by operation (control requests excluded)."""
        with self._lock:
            return dict(self._requests)

    def faults(self) -> dict[str, int]:
        """Faults that fired, as ``"kind:op"``."""
        with self._lock:
            return dict(self._faults)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self._requests), "faults": dict(self._faults),
                    "bytes_up": self._bytes["up"], "bytes_down": self._bytes["down"]}

    def reset_counts(self) -> dict[str, Any]:
        """Zero the counters; return what they were."""
        with self._lock:
            old = {"requests": dict(self._requests), "faults": dict(self._faults),
                   "bytes_up": self._bytes["up"], "bytes_down": self._bytes["down"]}
            self._requests.clear()
            self._faults.clear()
            self._bytes = {"up": 0, "down": 0}
        return old

    def state(self) -> dict[str, Any]:
        return {"upstream": f"http://{self.upstream_host}:{self.upstream_port}",
                "listen": self.url, "outage": self.outage,
                "rules": [asdict(rule) for rule in self.rules()], "counts": self.snapshot()}

    # -- used by the handlers

    def _count(self, op: str) -> None:
        with self._lock:
            self._requests[op] += 1

    def _count_fault(self, kind: str, op: str) -> None:
        with self._lock:
            self._faults[f"{kind}:{op}"] += 1

    def _count_bytes(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self._bytes["up"] += up
            self._bytes["down"] += down

    def _plan(self, op: str) -> Plan:
        plan = Plan()
        with self._lock:
            for rule in self._rules:
                if not rule.matches(op):
                    continue
                if rule.fault != "latency" and plan.fault is not None:
                    continue
                if rule.p < 1.0 and self._rng.random() >= rule.p:
                    continue
                rule.fired += 1
                if rule.fault == "latency":
                    plan.delay += rule.ms / 1000.0
                else:
                    plan.fault = rule
                    self._faults[f"{rule.fault}:{op}"] += 1
        return plan

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the proxy stops first; True if it slept the whole time."""
        return not self._stopping.wait(seconds) if seconds > 0 else True

    def _track(self, sock: socket.socket, live: bool) -> None:
        with self._lock:
            if live:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, proxy: FaultProxy, address: tuple[str, int]) -> None:
        self.proxy = proxy
        self.slots = threading.BoundedSemaphore(proxy.max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return _is_loopback(client_address[0])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # bounded: refuse what does not fit
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            log.info("connection from %s ended: %r", client_address, exc)
            return  # a client or upstream going away is business as usual here
        super().handle_error(request, client_address)


class _Reset(Exception):
    """Raised inside a handler once its client connection has been reset."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    upstream: http.client.HTTPConnection | None = None

    # -- plumbing

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def setup(self) -> None:
        self.timeout = self.proxy.idle_timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.proxy._track(self.connection, False)
        self._close_upstream()
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _reset(self) -> None:
        """Close the client connection with a TCP RST."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError, ValueError):
            self.rfile.close()  # the file holds a reference that would defer the close
        with contextlib.suppress(OSError):
            self.connection.close()
        raise _Reset

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _upstream(self, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        """The upstream connection and whether it was used before."""
        if self.upstream is not None and not fresh:
            sock = self.upstream.sock
            if sock is not None:
                readable, _, _ = select.select([sock], [], [], 0)
                if not readable:  # an idle connection with something to read was closed
                    return self.upstream, True
        self._close_upstream()
        self.upstream = http.client.HTTPConnection(
            self.proxy.upstream_host, self.proxy.upstream_port,
            timeout=self.proxy.upstream_timeout)
        return self.upstream, False

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)

    # -- dispatch

    def _handle(self) -> None:
        if self.path.startswith("http://"):
            # The absolute form: a client using this as its HTTP proxy (HTTP_PROXY). It is
            # served like any other request, to the upstream this proxy stands before.
            target = urlsplit(self.path)
            self.path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        try:
            if self.path.startswith(CONTROL):
                self._control()
            else:
                self._proxy()
        except _Reset:
            pass

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _handle

    # -- proxying

    def _request_body(self) -> tuple[bytes | None, Iterator[bytes] | None, int]:
        """(buffered body, or a stream of it, and its length; -1 when chunked)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b"".join(self._read_chunked(MAX_BUFFERED))
            return data, None, len(data)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length <= MAX_BUFFERED:
            return self._read_exact(length), None, length
        return None, self._stream_exact(length), length

    def _read_exact(self, length: int) -> bytes:
        data = self.rfile.read(length)
        if len(data) != length:
            raise ConnectionError("client closed during its request body")
        return data

    def _stream_exact(self, length: int) -> Iterator[bytes]:
        left = length
        while left:
            piece = self.rfile.read(min(CHUNK, left))
            if not piece:
                raise ConnectionError("client closed during its request body")
            left -= len(piece)
            yield piece

    def _read_chunked(self, limit: int) -> Iterator[bytes]:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            total += size
            if total > limit:
                raise ValueError("chunked request body too large")
            yield self._read_exact(size)
            self.rfile.readline(16)

    def _proxy(self) -> None:
        proxy = self.proxy
        op = classify(self.command, self.path, self.headers)
        proxy._count(op)
        if proxy.outage:
            proxy._count_fault("outage", op)
            self._reset()
        body, stream, length = self._request_body()
        plan = proxy._plan(op)
        if not proxy._sleep(plan.delay):
            self._reset()
        fault = plan.fault
        if fault is not None:
            if fault.fault == "error":
                self._send_error(fault)
                return
            if fault.fault == "reset_request":
                self._reset()
            if fault.fault == "stall" and fault.after_bytes is None:
                proxy._sleep(fault.seconds)
                self._reset()
        if body is not None:
            proxy._count_bytes(up=len(body))
        started = time.monotonic()
        try:
            response = self._forward(body, stream, length)
        except (OSError, http.client.HTTPException) as exc:
            log.warning("%s %s: upstream failed after %.1f s: %r", op, self.path,
                        time.monotonic() - started, exc)
            self._close_upstream()
            self._reset()  # the client sees what it would see if Azure were unreachable
        elapsed = time.monotonic() - started
        log.log(logging.WARNING if elapsed > SLOW else logging.DEBUG,
                "%s %s %s: %d in %.3f s%s", op, self.command, self.path, response.status,
                elapsed, f" ({fault.fault})" if fault else "")
        self._relay(response, fault)

    def _forward(self, body: bytes | None, stream: Iterator[bytes] | None,
                 length: int) -> http.client.HTTPResponse:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        for attempt in range(2):
            conn, reused = self._upstream(fresh=attempt > 0)
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for key, value in headers:
                    conn.putheader(key, value)
                if length or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(length))
                conn.endheaders()
                if body:
                    conn.send(body)
                elif stream is not None:
                    sent = 0
                    for piece in stream:
                        conn.send(piece)
                        sent += len(piece)
                    self.proxy._count_bytes(up=sent)
                return conn.getresponse()
            except (ConnectionError, http.client.BadStatusLine):
                self._close_upstream()
                # An idle keep-alive connection the upstream closed: once more, afresh.
                if attempt or not reused or stream is not None:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, response: http.client.HTTPResponse, fault: Rule | None) -> None:
        """Send the upstream response to the client, applying a response fault."""
        has_body = self.command != "HEAD" and response.status not in (204, 304) \
            and response.status >= 200
        length = response.length if has_body and not response.chunked else None
        close_delimited = has_body and not response.chunked and length is None
        cut: int | None = None  # body bytes to send before the fault acts
        if fault is not None and fault.fault in ("reset_response", "truncate", "stall"):
            if fault.after_bytes is not None:
                cut = fault.after_bytes
            elif length is not None:
                cut = length // 2
            elif has_body:
                cut = CHUNK
            if length is not None and cut is not None:
                cut = min(cut, max(length - 1, 0))
            if not has_body or length == 0:
                if fault.fault == "truncate":
                    fault = None  # nothing to cut short
                else:
                    cut = None  # act before the status line
        if fault is not None and cut is None:
            self._drain(response)  # the upstream did the work; the client never hears
            if fault.fault == "stall":
                self.proxy._sleep(fault.seconds)
            self._reset()
        head = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                head.append(f"{key}: {value}\r\n")
        if "content-length" in (k.lower() for k, _ in response.getheaders()) and \
                not response.chunked:
            head.append(f"Content-Length: {response.getheader('Content-Length')}\r\n")
        if has_body and response.chunked:
            head.append("Transfer-Encoding: chunked\r\n")
        if close_delimited:
            head.append("Connection: close\r\n")
            self.close_connection = True
        head.append("\r\n")
        sent = 0
        try:
            self._send("".join(head).encode("latin-1"))
            if has_body:
                while True:
                    want = CHUNK if cut is None else min(CHUNK, cut - sent)
                    piece = response.read1(want) if want > 0 else b""
                    if not piece:
                        break
                    self._send(b"%x\r\n%b\r\n" % (len(piece), piece) if response.chunked
                               else piece)
                    sent += len(piece)
                    if cut is not None and sent >= cut:
                        break
                if cut is None and response.chunked:
                    self._send(b"0\r\n\r\n")
        except OSError as exc:
            log.info("%s %s: client went away after %d body bytes: %r", self.command,
                     self.path, sent, exc)
            self.proxy._count_bytes(down=sent)
            self._drain(response)  # the client went away; finish reading for Azurite
            self.close_connection = True
            return
        self.proxy._count_bytes(down=sent)
        self._drain(response)
        if cut is not None and fault is not None:
            if fault.fault == "truncate":
                self.close_connection = True  # FIN after fewer bytes than announced
                return
            if fault.fault == "stall":
                self.proxy._sleep(fault.seconds)
            self._reset()
        if response.will_close:
            self._close_upstream()

    def _drain(self, response: http.client.HTTPResponse) -> None:
        """Read the rest of an upstream body, so the upstream can release it."""
        try:
            while response.read1(CHUNK):
                pass
            response.close()  # a finished response frees its connection for the next request
        except (OSError, http.client.HTTPException):
            self._close_upstream()

    def _send_error(self, rule: Rule) -> None:
        status = int(rule.status)
        code = rule.code or DEFAULT_CODES.get(status, "InternalError")
        message = MESSAGES.get(code, code)
        request_id = str(uuid.uuid4())
        when = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime())
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}\nRequestId:{request_id}\nTime:{when}</Message></Error>"
                ).encode()
        headers = [
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/xml"),
            ("Server", "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0"),
            ("x-ms-request-id", request_id),
            ("x-ms-version", self.headers.get("x-ms-version") or "2021-08-06"),
            ("x-ms-error-code", code),
            ("Date", formatdate(usegmt=True)),
        ]
        if self.headers.get("x-ms-client-request-id"):
            headers.append(("x-ms-client-request-id", self.headers["x-ms-client-request-id"]))
        if rule.retry_after is not None:
            headers.append(("Retry-After", f"{rule.retry_after:g}"))
        head = f"HTTP/1.1 {status} {message}\r\n" + "".join(
            f"{key}: {value}\r\n" for key, value in headers) + "\r\n"
        self._send(head.encode("latin-1") + (b"" if self.command == "HEAD" else body))

    # -- control

    def _control(self) -> None:
        proxy = self.proxy
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_CONTROL_BODY:
            self._answer(413, {"error": "control body too large"})
            self.close_connection = True
            return
        raw = self._read_exact(length) if length else b""
        path = self.path.split("?", 1)[0].rstrip("/")[len(CONTROL):] or "/"
        method = self.command
        try:
            data = json.loads(raw) if raw.strip() else None
            if path == "/" and method == "GET":
                result: Any = proxy.state()
            elif path == "/counts" and method == "GET":
                result = proxy.snapshot()
            elif (path == "/counts/reset" and method == "POST") or \
                    (path == "/counts" and method == "DELETE"):
                result = proxy.reset_counts()
            elif path == "/rules" and method == "GET":
                result = [asdict(rule) for rule in proxy.rules()]
            elif path == "/rules" and method == "POST":
                items = data if isinstance(data, list) else [data]
                parsed = [Rule.from_json(item) for item in items]
                result = [asdict(proxy.add_rule(rule)) for rule in parsed]
            elif path == "/rules" and method == "PUT":
                if not isinstance(data, list):
                    raise ValueError("PUT /rules takes a list of rules")
                result = [asdict(rule) for rule in proxy.set_rules(data)]
            elif path == "/rules" and method == "DELETE":
                proxy.clear_rules()
                result = []
            elif path.startswith("/rules/") and method == "DELETE":
                if not proxy.remove_rule(int(path[len("/rules/"):])):
                    self._answer(404, {"error": "no such rule"})
                    return
                result = [asdict(rule) for rule in proxy.rules()]
            elif path == "/outage" and method in ("GET", "POST", "PUT"):
                if method != "GET":
                    if not isinstance(data, dict) or "on" not in data:
                        raise ValueError('outage takes {"on": true|false}')
                    proxy.set_outage(bool(data["on"]))
                result = {"on": proxy.outage}
            elif path == "/seed" and method in ("POST", "PUT"):
                if not isinstance(data, dict) or "seed" not in data:
                    raise ValueError('seed takes {"seed": N}')
                proxy.seed(data["seed"])
                result = {"seed": data["seed"]}
            else:
                self._answer(404, {"error": f"no control endpoint {method} {CONTROL}{path}"})
                return
        except (ValueError, TypeError) as exc:
            self._answer(400, {"error": str(exc)})
            return
        self._answer(200, result)

    def _answer(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        reason = http.client.responses.get(status, "")
        self._send(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


# -- command line ---------------------------------------------------------------------------

def _host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    if "://" in text:
        parts = urlsplit(text)
        return parts.hostname or default_host, parts.port or 80
    host, _, port = text.rpartition(":")
    return host.strip("[]") or default_host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.faultproxy",
        description="Loopback fault-injecting HTTP proxy in front of Azurite; prints its port.")
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of Azurite")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: any port)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.0, metavar="MS",
                        help="delay every request by MS milliseconds")
    parser.add_argument("--rules", help="a JSON file holding a list of rules")
    args = parser.parse_args(argv)
    upstream_host, upstream_port = _host_port(args.upstream)
    listen_host, listen_port = _host_port(args.listen)
    try:
        proxy = FaultProxy(upstream_port, upstream_host=upstream_host, listen_host=listen_host,
                           listen_port=listen_port, seed=args.seed)
        if args.latency:
            proxy.add_rule("latency", ms=args.latency)
        if args.rules:
            with open(args.rules) as handle:
                proxy.set_rules(json.load(handle))
        proxy.start()
    except (OSError, ValueError) as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    print(proxy.port, flush=True)
    while not done.wait(1.0):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
