"""The storage driver: every Azure Blob call, and the mapping of its errors to errno.

Nothing else in azregfs imports the SDK. Calls run the synchronous azure-storage-blob
client in worker threads (``trio.to_thread.run_sync``) behind one CapacityLimiter, so the
event loop never blocks and the number of requests in flight is bounded. Names passed in
and out are full blob names (the rootdirectory prefix included); the namespace maps paths.

Every method raises ``StorageError`` (with an errno) and nothing else; the message is one
line an operator can act on and never contains a credential.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote

import requests
import trio
import urllib3
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.storage.blob import (
    BlobBlock,
    BlobProperties,
    BlobType,
    ContainerClient,
    ContentSettings,
)

from ..config import Config
from ..ops.metrics import Metrics, RequestMeter
from .blobs import BlobInfo, ListPage, list_query, parse_list
from .throttle import Concurrency, RetryAfterRetry

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_NAME = 1024
MAX_METADATA = 8 * 1024  # names and values of one blob's metadata together
LIST_PAGE = 5000


class StorageError(Exception):
    repeated = False  # a failure remembered a moment ago (recent.py), not asked again

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


@dataclass
class CommittedBlock:
    block_id: str
    size: int


def check_metadata(name: str, metadata: dict[str, str]) -> None:
    """E2BIG before Azure refuses metadata over its limit (Azurite does not check it)."""
    size = sum(len(key) + len(value.encode()) for key, value in metadata.items())
    if size > MAX_METADATA:
        raise StorageError(errno.E2BIG, f"{name}: its metadata would take {size:,} bytes; "
                           f"Azure keeps at most {MAX_METADATA:,} per blob")


# What reading a streamed body raises when the connection fails under it.
_CUT_SHORT = (AzureError, requests.RequestException, OSError, urllib3.exceptions.HTTPError,
              http.client.HTTPException)


def _body(response: Any) -> bytes:
    """A streamed answer's whole body in one read from the socket into one buffer. The
    pipeline's own read() gathers 256 KiB pieces and joins them: a second copy of every
    byte, a quarter of the daemon's CPU in a pull (bench/registry.py --profile)."""
    raw = getattr(getattr(response, "internal_response", None), "raw", None)
    if raw is None or not hasattr(raw, "release_conn"):
        return response.read()
    data = raw.read(decode_content=False)
    raw.release_conn()  # read to its end: the connection goes back to the pool
    expected = response.headers.get("Content-Length")
    if expected is not None and len(data) != int(expected):
        raise ServiceResponseError(f"body cut short: {len(data)} of {expected} bytes")
    return data


def _split(data: bytes, piece: int) -> list[bytearray]:
    """data in buffers of `piece` bytes (the last one shorter), each its own copy."""
    return [bytearray(data[start:start + piece]) for start in range(0, len(data), piece)]


def _body_into(response: Any, length: int, piece: int) -> list[bytearray]:
    """A streamed answer of `length` bytes read from the socket straight into buffers of
    `piece` bytes (the last one shorter): the block cache's blocks, with no copy of the
    body between (py-spy on a pull: cutting a joined body into blocks was 12% of the
    daemon's samples). Through the standard library's response under urllib3's, whose
    own readinto reads into a temporary and copies."""
    raw = getattr(getattr(response, "internal_response", None), "raw", None)
    source = getattr(raw, "_fp", None)
    if not hasattr(source, "readinto") or not hasattr(raw, "release_conn"):
        return _split(_body(response), piece)
    expected = response.headers.get("Content-Length")
    if expected is not None:
        length = int(expected)  # (shorter when the range runs past the end)
    pieces, got = [], 0
    while got < length:
        buffer = bytearray(min(piece, length - got))
        with memoryview(buffer) as view:
            filled = 0
            while filled < len(buffer):
                count = source.readinto(view[filled:])
                if not count:
                    raw.close()  # the connection is not reusable mid-body
                    raise ServiceResponseError(
                        f"body cut short: {got + filled} of {length} bytes")
                filled += count
        pieces.append(buffer)
        got += filled
    raw.release_conn()  # read to its end: the connection goes back to the pool
    return pieces


def _refusal(response: Any) -> HttpResponseError:
    """The SDK's error for an answer our own requests (list, ranged GET) got refused, as
    map_error expects it: its type for 404 and 412, Azure's error code kept."""
    error_type = {404: ResourceNotFoundError, 412: ResourceModifiedError}.get(
        response.status_code, HttpResponseError)
    error = error_type(response=response)
    error.error_code = response.headers.get("x-ms-error-code")
    return error


def bare_etag(etag: str | None) -> str:
    """An ETag as listings send it, without quotes. HEAD and write answers quote it; one
    form keeps one version one key (the block cache, keep_cache), and Azure compares either
    form in a condition."""
    return (etag or "").strip('"')


def _info(props: BlobProperties) -> BlobInfo:
    blob_type = props.blob_type
    if isinstance(blob_type, BlobType):
        type_name = blob_type.value
    else:
        type_name = str(blob_type or "BlockBlob")
    settings = props.content_settings
    return BlobInfo(
        name=props.name,
        size=props.size or 0,
        etag=bare_etag(props.etag),
        mtime=props.last_modified.timestamp() if props.last_modified else 0.0,
        metadata=dict(props.metadata or {}),
        blob_type=type_name,
        content_type=settings.content_type if settings else None,
        content_md5=bytes(settings.content_md5) if settings and settings.content_md5 else None,
    )


def _written(name: str, size: int, response: dict[str, Any], metadata: dict[str, str],
             content_type: str | None) -> BlobInfo:
    """The properties of a blob we just wrote, from the write's own response."""
    modified = response.get("last_modified")
    md5 = response.get("content_md5")
    return BlobInfo(name, size, bare_etag(response.get("etag")),
                    modified.timestamp() if modified else time.time(), dict(metadata),
                    "BlockBlob", content_type, bytes(md5) if md5 else None)


class _Retries:
    """An SDK call's retry_hook: was it retried? A write refused on a retry by its own
    condition (create-only, append position, delete of a missing blob) may be refused
    because an earlier attempt did it and its answer was lost."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, **_: Any) -> None:
        self.seen = True


def _lost_answer(name: str, info: Any) -> Any:
    log.info("%s: the write was done by an attempt whose answer was lost; not done twice",
             name)
    return info


def describe(exc: BaseException) -> str:
    """One line, without headers or credentials."""
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "error_code", None) or ""
        code = getattr(code, "value", code)
        status = getattr(exc, "status_code", None) or ""
        reason = getattr(exc, "reason", None) or ""
        response = getattr(exc, "response", None)
        request_id = response.headers.get("x-ms-request-id") if response is not None else None
        # The request ID finds the request in Azure's own logs (and in a support case).
        return f"HTTP {status} {code or reason}".strip() + (
            f", request-id {request_id}" if request_id else "")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def map_error(exc: BaseException, what: str) -> StorageError:
    if isinstance(exc, ResourceNotFoundError):
        return StorageError(errno.ENOENT, f"{what}: not found")
    if isinstance(exc, ResourceModifiedError):
        return StorageError(errno.ESTALE, f"{what}: changed by another writer ({describe(exc)})")
    if isinstance(exc, ResourceExistsError):
        return StorageError(errno.EEXIST, f"{what}: already exists ({describe(exc)})")
    if isinstance(exc, ClientAuthenticationError):
        return StorageError(errno.EACCES, f"{what}: access denied ({describe(exc)})")
    if isinstance(exc, HttpResponseError):
        status = exc.status_code
        if status == 403:
            return StorageError(errno.EACCES, f"{what}: access denied ({describe(exc)})")
        if status == 412:
            return StorageError(errno.ESTALE, f"{what}: changed by another writer")
        if status == 409 and (exc.error_code or "") in ("BlobAlreadyExists",):
            return StorageError(errno.EEXIST, f"{what}: already exists")
        if status == 400 and (exc.error_code or "") in ("InvalidResourceName", "InvalidUri"):
            return StorageError(errno.EINVAL, f"{what}: invalid name")
        return StorageError(errno.EIO, f"{what}: {describe(exc)}")
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return StorageError(
            errno.EIO, f"{what}: cannot reach the storage service ({describe(exc)})"
        )
    if isinstance(exc, AzureError):
        return StorageError(errno.EIO, f"{what}: {describe(exc)}")
    return StorageError(errno.EIO, f"{what}: {type(exc).__name__}: {describe(exc)}")


def _make_container_client(cfg: Config, *, retries: int, timeout: float,
                           metrics: Metrics | None = None,
                           concurrency: Concurrency | None = None) -> ContainerClient:
    session = requests.Session()
    # With trust_env, requests reads the environment's proxies, CA bundle and ~/.netrc
    # again for every request: scanning os.environ for proxies twice a request was about a
    # third of the CPU of a small GET (cProfile: 1.9 ms a GET). They are read once here for
    # the one endpoint this client talks to (see _settle_environment).
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=4, pool_maxsize=cfg.max_concurrency + 4
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    common: dict[str, Any] = {
        # A transport we build does not get the storage SDK's 256 KiB read size: without it
        # responses stream in 4 KiB pieces, which tripled the CPU cost of every download.
        # The timeouts go to the transport itself: the client's connection_timeout and
        # read_timeout below only configure a transport the SDK builds, not one passed in.
        "transport": RequestsTransport(session=session, session_owner=True,
                                       connection_data_block_size=256 * 1024,
                                       connection_timeout=min(timeout, 10.0),
                                       read_timeout=timeout,
                                       connection_verify=ca_bundle or True),
        "retry_policy": RetryAfterRetry(initial_backoff=1, increment_base=2,
                                        retry_total=retries),
        "connection_timeout": min(timeout, 10.0),
        "read_timeout": timeout,
        "max_single_put_size": 64 * 1024 * 1024,
        "max_single_get_size": 64 * 1024 * 1024,
    }
    if metrics is not None:
        # After the retry policy, so it sees every attempt. The SDK has no public knob for
        # a per-attempt policy that also sees failed connections (raw_response_hook does
        # not), hence this long-standing keyword.
        common["_additional_pipeline_policies"] = [RequestMeter(metrics, concurrency)]
    if cfg.connection_string and not cfg.endpoint:
        client = ContainerClient.from_connection_string(
            cfg.connection_string, cfg.container, **common
        )
    else:
        client = ContainerClient(cfg.account_url, cfg.container, credential=_credential(cfg),
                                 **common)
    # HTTP(S)_PROXY and NO_PROXY, as requests would have read them for this endpoint.
    session.proxies.update(requests.utils.get_environ_proxies(client.url))
    return client


def _credential(cfg: Config) -> Any:
    kind = cfg.credentials.type
    if kind == "client_secret":
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(
            cfg.credentials.tenantid, cfg.credentials.clientid, cfg.credentials.secret
        )
    if kind == "default_credentials":
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential()
    if cfg.sas_token and kind != "shared_key":
        from azure.core.credentials import AzureSasCredential

        return AzureSasCredential(cfg.sas_token.lstrip("?"))
    if cfg.connection_string:
        parts = dict(
            item.split("=", 1) for item in cfg.connection_string.split(";") if "=" in item
        )
        if parts.get("AccountKey"):
            return {"account_name": parts.get("AccountName", ""),
                    "account_key": parts["AccountKey"]}
        if parts.get("SharedAccessSignature"):
            from azure.core.credentials import AzureSasCredential

            return AzureSasCredential(parts["SharedAccessSignature"])
    if cfg.accountkey:
        return {"account_name": cfg.accountname, "account_key": cfg.accountkey}
    return None  # anonymous (public container)


def sas_refuses_writes(cfg: Config) -> bool:
    """A SAS whose permissions (sp=) allow neither write nor create: every write would get
    403, so operations that would otherwise defer their request can refuse at once."""
    token = cfg.sas_token
    if not token and cfg.connection_string:
        parts = dict(item.split("=", 1) for item in cfg.connection_string.split(";")
                     if "=" in item)
        if parts.get("AccountKey"):
            return False
        token = parts.get("SharedAccessSignature", "")
    if not token or cfg.accountkey or cfg.credentials.type:
        return False
    permissions = parse_qs(token.lstrip("?")).get("sp", [""])[0]
    return bool(permissions) and not set(permissions) & {"w", "c"}


def _probe_container(client: ContainerClient) -> None:
    """Get Container Properties; failing that with 403, list one blob: a container SAS can
    never read container properties, yet with list permission it serves a mount."""
    try:
        client.get_container_properties()
    except HttpResponseError as exc:
        if exc.status_code != 403:
            raise
        try:
            for _ in next(client.list_blobs(results_per_page=1).by_page(), []):
                pass
        except HttpResponseError as listing_exc:
            if listing_exc.status_code == 403:
                raise exc from None  # the first refusal says more (e.g. a wrong key)
            raise


def check_access(cfg: Config) -> None:
    """Prove the account and container work before mounting; raise StorageError if not.

    Synchronous on purpose: it runs in the CLI before the daemon and its event loop start.
    """
    client = _make_container_client(cfg, retries=1, timeout=min(cfg.timeout, 10.0))
    where = f"container {cfg.container!r} at {client.primary_endpoint.split('?')[0]}"
    try:
        _probe_container(client)
    except ResourceNotFoundError:
        if not cfg.create_container:
            raise StorageError(
                errno.ENOENT, f"{where} does not exist (create it, or pass --create-container)"
            ) from None
        try:
            client.create_container()
            log.info("created %s", where)
        except ResourceExistsError:
            pass
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise map_error(exc, f"creating {where}") from None
    except ClientAuthenticationError as exc:
        raise StorageError(
            errno.EACCES,
            f"authentication failed for {where} ({describe(exc)}): check the account key, "
            "SAS token or credentials",
        ) from None
    except HttpResponseError as exc:
        if exc.status_code == 403:
            raise StorageError(
                errno.EACCES,
                f"access denied to {where} ({describe(exc)}): check the account key, "
                "SAS token or credentials",
            ) from None
        raise map_error(exc, where) from None
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise StorageError(
            errno.EHOSTUNREACH, f"cannot reach {where}: {describe(exc)}"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise map_error(exc, where) from None
    finally:
        client.close()


class Driver:
    """Async facade over one container. All names are full blob names."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        # Every request is counted by the pipeline (RequestMeter), once per attempt.
        self.metrics = metrics or Metrics(cfg.container)
        # Requests in flight: at most max_concurrency, halved while Azure throttles us.
        self.concurrency = Concurrency(cfg.max_concurrency)
        self.container = _make_container_client(cfg, retries=cfg.retries, timeout=cfg.timeout,
                                                metrics=self.metrics,
                                                concurrency=self.concurrency)
        self.limiter = trio.CapacityLimiter(cfg.max_concurrency)
        self.writes_refused = sas_refuses_writes(cfg)

    def close(self) -> None:
        self.container.close()

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            # A cancelled call (only a stop cancels: a second SIGTERM, the end of the loop)
            # returns at once; its thread finishes or dies with the process. A request is
            # atomic in Azure, so whatever it did is whole.
            return await trio.to_thread.run_sync(fn, limiter=self.limiter,
                                                 abandon_on_cancel=True)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK error becomes a StorageError
            raise map_error(exc, what) from None
        finally:
            limit = self.concurrency.limit
            if self.limiter.total_tokens != limit:
                if limit < self.limiter.total_tokens:
                    log.warning("Azure is throttling (503 ServerBusy): requests in flight "
                                "%d -> %d", self.limiter.total_tokens, limit)
                else:
                    log.debug("Azure request concurrency back up to %d", limit)
                self.limiter.total_tokens = limit

    def _blob(self, name: str) -> Any:
        return self.container.get_blob_client(name)

    # -- metadata --------------------------------------------------------------------------

    async def head(self, name: str) -> BlobInfo | None:
        def call() -> BlobInfo | None:
            try:
                return _info(self._blob(name).get_blob_properties())
            except ResourceNotFoundError:
                return None

        return await self._run(f"HEAD {name}", call)

    def _list_page(self, prefix: str, max_results: int, marker: str | None = None,
                   delimiter: str | None = None, same_as: bytes | None = None) -> ListPage:
        """One List Blobs request, in a worker thread. Through the client's own pipeline
        (credentials, retries, the request meter), but parsed by blobs.py, not the SDK.
        With `same_as` (not None) the page gets its body's digest, and an answer whose
        digest it is is not parsed: the caller has it. Only a walk's pages need one."""
        base, _, sas = self.container.url.partition("?")
        query = list_query(prefix, delimiter, max_results, marker)
        for attempt in range(self.cfg.retries + 1):
            request = HttpRequest("GET", f"{base}?{query}" + (f"&{sas}" if sas else ""),
                                  headers={"x-ms-version": self.container.api_version})
            # stream=True: the pipeline's ContentDecodePolicy would otherwise parse the XML
            # a second time (with ElementTree, for nothing), as much CPU as parse_list.
            response = self.container._client._send_request(request, stream=True)
            try:
                body = _body(response)
            except _CUT_SHORT:
                # The body was cut short: outside the pipeline's retries once streamed.
                if attempt == self.cfg.retries:
                    raise
                log.debug("LIST %s: answer cut short; asking again", prefix)
                continue
            if response.status_code != 200:
                raise _refusal(response)
            if same_as is None:
                return parse_list(body)
            digest = hashlib.blake2b(body, digest_size=16).digest()
            if digest == same_as:
                return ListPage([], [], None, digest, unchanged=True)
            page = parse_list(body)
            page.digest = digest
            return page
        raise AssertionError("unreachable")

    async def has_children(self, prefix: str) -> bool:
        """True if any blob name starts with prefix (which ends in '/')."""

        def call() -> bool:
            return bool(self._list_page(prefix, 1).blobs)

        return await self._run(f"LIST {prefix}", call)

    async def list_level_small(
        self, prefix: str, limit: int
    ) -> tuple[list[BlobInfo], list[str]] | None:
        """The whole level under prefix if it fits in one page of `limit`, else None."""

        def call() -> tuple[list[BlobInfo], list[str]] | None:
            page = self._list_page(prefix, limit, delimiter="/")
            return None if page.next_marker else (page.blobs, page.prefixes)

        return await self._run(f"LIST {prefix}", call)

    async def list_subtree_small(self, prefix: str, limit: int) -> tuple[list[BlobInfo], bool]:
        """Every blob under prefix, at any depth, and True, if there are at most `limit`;
        else the first of them in name order (at least `limit`) and False.

        Pages of LIST_PAGE; a full last page may come with a continuation that leads to
        nothing, so the bound is checked on what the pages hold, not on the marker."""

        def call() -> tuple[list[BlobInfo], bool]:
            blobs: list[BlobInfo] = []
            marker: str | None = None
            while True:
                page = self._list_page(prefix, min(limit, LIST_PAGE), marker)
                blobs += page.blobs
                marker = page.next_marker
                if len(blobs) > limit or (len(blobs) == limit and marker):
                    return blobs, False
                if not marker:
                    return blobs, True

        return await self._run(f"LIST {prefix}", call)

    async def list_page(self, prefix: str, marker: str | None, size: int = LIST_PAGE,
                        same_as: bytes = b"") -> ListPage:
        """One page (up to `size` blobs, at most LIST_PAGE) of every blob under prefix, at
        any depth, from the continuation `marker` (None: the first). If its answer is the
        one of digest `same_as` (an earlier ListPage.digest), an empty page marked
        ``unchanged``: a walk asking again for a page it has (listings expire under it)
        then parses nothing."""
        return await self._run(f"LIST {prefix}", functools.partial(
            self._list_page, prefix, min(size, LIST_PAGE), marker, None, same_as))

    async def list_level(
        self, prefix: str
    ) -> AsyncIterator[tuple[list[BlobInfo], list[str]]]:
        """Yield pages of (blobs, sub-prefixes) directly under prefix (delimiter '/')."""
        async for page in self._pages(prefix, delimiter="/"):
            yield page.blobs, page.prefixes

    async def list_all(self, prefix: str) -> AsyncIterator[list[BlobInfo]]:
        """Yield pages of every blob under prefix, at any depth."""
        async for page in self._pages(prefix):
            yield page.blobs

    async def _pages(self, prefix: str, delimiter: str | None = None
                     ) -> AsyncIterator[ListPage]:
        marker: str | None = None
        while True:
            page = await self._run(f"LIST {prefix}", functools.partial(
                self._list_page, prefix, LIST_PAGE, marker, delimiter))
            yield page
            marker = page.next_marker
            if not marker:
                return

    async def set_metadata(self, name: str, metadata: dict[str, str]) -> str:
        check_metadata(name, metadata)

        def call() -> str:
            return bare_etag(self._blob(name).set_blob_metadata(metadata)["etag"])

        return await self._run(f"set metadata of {name}", call)

    # -- data ------------------------------------------------------------------------------

    async def read(self, name: str, offset: int, length: int, etag: str | None = None) -> bytes:
        """Read [offset, offset+length) of one version of a blob (ESTALE if it changed)."""
        return await self._ranged(name, offset, length, etag, 0)  # type: ignore[no-any-return]

    async def read_blocks(self, name: str, offset: int, length: int, etag: str,
                          piece: int) -> list[bytearray]:
        """Like read, in buffers of `piece` bytes each (the last one shorter), read from
        the socket without a copy between: the block cache's blocks."""
        return await self._ranged(name, offset, length, etag, piece)  # type: ignore[no-any-return]

    async def _ranged(self, name: str, offset: int, length: int, etag: str | None,
                      piece: int) -> Any:
        def call() -> bytes | list[bytearray]:
            deadline = time.monotonic() + self.cfg.timeout * (self.cfg.retries + 1)
            while True:
                try:
                    return self._get(name, offset, length, etag, piece)
                except _CUT_SHORT as exc:
                    # A body cut short (not an answer from Azure: no status) is asked again
                    # while this call is within its bound, rather than failing a read the
                    # kernel would only ask again for.
                    if getattr(exc, "status_code", None) is not None or \
                            time.monotonic() >= deadline:
                        raise
                    log.debug("read %s [%d+%d]: body cut short; asking again",
                              name, offset, length)

        return await self._run(f"read {name} [{offset}+{length}]", call)

    def _get(self, name: str, offset: int, length: int, etag: str | None,
             piece: int = 0) -> bytes | list[bytearray]:
        """One ranged Get Blob, in a worker thread: through the client's pipeline
        (credentials, retries, the request meter) but not the SDK's downloader, whose
        bookkeeping cost 1.3 ms of CPU a GET (half of it; bench/gc.py). With `piece`, the
        body comes in buffers of that size (read_blocks)."""
        base, _, sas = self.container.url.partition("?")
        url = f"{base}/{quote(name, safe='~/')}" + (f"?{sas}" if sas else "")
        headers = {"x-ms-version": self.container.api_version,
                   "x-ms-range": f"bytes={offset}-{offset + length - 1}"}
        if etag:
            headers["If-Match"] = etag if etag.startswith('"') else f'"{etag}"'
        response = self.container._client._send_request(HttpRequest("GET", url, headers=headers),
                                                        stream=True)
        if response.status_code == 206 and piece:
            return _body_into(response, length, piece)
        body = _body(response)
        if response.status_code == 200:  # the whole blob: a server that ignored the range
            body = body[offset:offset + length]
        elif response.status_code == 416:
            body = b""  # the range starts at or past the end
        elif response.status_code != 206:
            raise _refusal(response)
        if not piece:
            return body
        return _split(body, piece)

    async def get_block_list(self, name: str) -> list[CommittedBlock] | None:
        """The committed blocks, or None when their IDs are not text we can send back."""

        def call() -> list[CommittedBlock] | None:
            try:
                committed, _ = self._blob(name).get_block_list("committed")
            except UnicodeDecodeError:
                return None
            return [CommittedBlock(block.id, block.size) for block in committed]

        return await self._run(f"get block list of {name}", call)

    async def stage_block(self, name: str, block_id: str, data: bytes) -> None:
        def call() -> None:
            self._blob(name).stage_block(block_id, data, length=len(data))

        await self._run(f"stage block of {name}", call)

    async def commit_blocks(
        self, name: str, block_ids: list[str], size: int, metadata: dict[str, str],
        content_type: str | None = None, exclusive: bool = False,
    ) -> BlobInfo:
        """Put Block List; `size` is the blocks' total (the caller planned them)."""
        check_metadata(name, metadata)

        def call() -> BlobInfo:
            kwargs: dict[str, Any] = {}
            if exclusive:
                kwargs = {"match_condition": MatchConditions.IfMissing}
            blob = self._blob(name)
            retries = _Retries()
            try:
                result = blob.commit_block_list(
                    [BlobBlock(block_id) for block_id in block_ids], metadata=metadata,
                    content_settings=ContentSettings(content_type=content_type),
                    retry_hook=retries, **kwargs,
                )
            except ResourceExistsError:
                # Block IDs carry the session's random token: the same list is our commit.
                if not retries.seen or [block.id for block in
                                        blob.get_block_list("committed")[0]] != block_ids:
                    raise
                return _lost_answer(name, _info(blob.get_blob_properties()))
            # The response has the new ETag and time: no HEAD after each commit.
            return _written(name, size, result, metadata, content_type)

        return await self._run(f"commit {name}", call)

    async def put(
        self, name: str, data: bytes, metadata: dict[str, str],
        content_type: str | None = None, exclusive: bool = False,
    ) -> BlobInfo:
        """One Put Blob: atomic replace (or create-only when exclusive)."""
        check_metadata(name, metadata)

        def call() -> BlobInfo:
            settings = ContentSettings(content_type=content_type)
            blob = self._blob(name)
            retries = _Retries()
            try:
                result = blob.upload_blob(
                    data, overwrite=not exclusive, metadata=metadata, max_concurrency=1,
                    content_settings=settings, length=len(data), retry_hook=retries,
                )
            except ResourceExistsError:
                # Put Blob stores the MD5 of what it got: the same bytes are our write.
                if not retries.seen:
                    raise
                info = blob.get_blob_properties()
                md5 = info.content_settings.content_md5
                if info.size != len(data) or not md5 or bytes(md5) != hashlib.md5(
                        data, usedforsecurity=False).digest():
                    raise
                return _lost_answer(name, _info(info))
            # The response has what a HEAD would tell: no second request per small file.
            return _written(name, len(data), result, metadata, settings.content_type)

        return await self._run(f"put {name}", call)

    async def append(self, name: str, data: bytes, position: int) -> str:
        """Append Block at an expected position (so two appenders never interleave)."""

        def call() -> str:
            blob = self._blob(name)
            retries = _Retries()
            try:
                result = blob.append_block(
                    data, length=len(data), appendpos_condition=position, retry_hook=retries
                )
            except HttpResponseError as exc:
                # 412 on a retry: the blob has grown; by exactly these bytes if they were ours.
                if exc.status_code != 412 or not retries.seen:
                    raise
                tail = blob.download_blob(offset=position, length=len(data), max_concurrency=1)
                total = (tail.properties.content_range or "").rpartition("/")[2]
                if total != str(position + len(data)) or tail.readall() != data:
                    raise
                return bare_etag(_lost_answer(name, tail.properties).etag)
            return bare_etag(result["etag"])

        return await self._run(f"append to {name}", call)

    async def delete(self, name: str, missing_ok: bool = True) -> None:
        def call() -> None:
            retries = _Retries()
            try:
                self._blob(name).delete_blob(retry_hook=retries)
            except ResourceNotFoundError:
                # A 404 after a retry: an earlier attempt may have deleted it and lost its
                # answer (connection reset after Azure acted). Deleted either way.
                if not missing_ok and not retries.seen:
                    raise

        await self._run(f"delete {name}", call)

    async def copy(self, source: str, target: str, source_info: BlobInfo | None = None
                   ) -> BlobInfo:
        """Server-side copy; waits for an asynchronous copy to finish by its status.

        A copy that completes at once (within an account it usually does) answers with the
        target's ETag; with the source's properties known, no HEAD follows."""
        source_url = self._blob(source).url

        def start() -> Any:
            return self._blob(target).start_copy_from_url(source_url)

        started = await self._run(f"copy {source} to {target}", start)
        if source_info is not None and started.get("copy_status") == "success":
            copied = _written(target, source_info.size, started, source_info.metadata,
                              source_info.content_type)
            copied.blob_type = source_info.blob_type  # Copy Blob keeps the type
            return copied
        delay = 0.05
        while True:
            info_props = await self._run(
                f"copy status of {target}", self._blob(target).get_blob_properties
            )
            status = info_props.copy.status if info_props.copy else "success"
            if status in (None, "success"):
                return _info(info_props)
            if status != "pending":
                raise StorageError(
                    errno.EIO,
                    f"copy {source} to {target} ended {status}: "
                    f"{info_props.copy.status_description}",
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def probe(self) -> None:
        """One cheap request that proves the container answers (azregfs check)."""
        await self._run(f"container {self.cfg.container}",
                        lambda: _probe_container(self.container))
