"""Where a dataset's bytes live: a local directory, ``s3://bucket/prefix`` or ``https://host/prefix``.

One layer below ``catalog`` and ``shards``: both reach objects in object storage only through this module, and
it imports neither. Clients are obstore's (Rust ``object_store``): one process keeps many requests in flight,
retries 5xx, ``503 SlowDown`` and dropped connections with backoff, and reads several byte ranges of an object
in one gathered call.

Settings come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``); with none
of the credential sources set, requests go unsigned (public buckets). Credentials are read by the client in the
process that uses it and are never put in a store's configuration, so a pickled reader carries none; a URL
with credentials in it is refused.

A client is made per process: a client made before ``fork`` must not be used in the child (obstore's runtime
does not survive it), so the cache of clients is emptied in every forked child; processes that read remote data
in DataLoader workers start them with ``forkserver``.
"""

from __future__ import annotations

import asyncio
import atexit
import configparser
import gc
import hashlib
import os
import re
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import HTTPStore, LocalStore, S3Store

__all__ = [
    "StorageError",
    "is_remote",
    "check_url",
    "dataset_ref",
    "dataset_exists",
    "Storage",
    "storage",
    "run",
    "submit",
    "cache_root",
    "file_sha256",
    "bytes_match",
    "forget_clients",
]

REMOTE_SCHEMES = ("s3", "http", "https")
# Query parameters that carry a signature or a key (presigned URLs): such a URL would put a credential in logs.
_SECRET_QUERY = re.compile(r"(x-amz-(credential|signature|security-token)|awsaccesskeyid|signature|sig|token)=",
                           re.IGNORECASE)
_RETRY_TIMEOUT_S = float(os.environ.get("SAGEPAIRS_STORAGE_RETRY_S", "30"))


class StorageError(OSError):
    """One line naming the URL and what to check; it never holds a credential."""


def is_remote(dataset: str | os.PathLike[str]) -> bool:
    """True for ``s3://``, ``http://`` and ``https://`` datasets (anything else is a local path)."""
    return isinstance(dataset, str) and urlsplit(dataset).scheme.lower() in REMOTE_SCHEMES


def check_url(url: str) -> str:
    """The URL without a trailing slash; refuses one that carries credentials or names no bucket or host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{url}: not an s3://, http:// or https:// URL")
    if parts.username is not None or parts.password is not None or _SECRET_QUERY.search(parts.query):
        shown = f"{scheme}://{parts.hostname or ''}{parts.path}"
        raise StorageError(
            f"{shown}: the URL carries credentials; remove them and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE instead (credentials never go in a URL, a config file or a log)"
        )
    if not parts.netloc:
        raise StorageError(f"{url}: no {'bucket' if scheme == 's3' else 'host'} in the URL")
    if parts.query or parts.fragment:
        raise StorageError(f"{url}: a dataset URL takes no query or fragment")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def dataset_ref(dataset: str | os.PathLike[str]) -> str | Path:
    """A dataset as readers take it: the checked URL of a publication, or a local Path (``Path("s3://b/p")``
    would fold the ``//``, so a URL stays a string)."""
    return check_url(str(dataset)) if is_remote(str(dataset)) else Path(dataset)


def dataset_exists(dataset: str | os.PathLike[str]) -> bool:
    """A local dataset's directory exists; a URL is taken as given (opening its catalog says what is wrong)."""
    return is_remote(str(dataset)) or Path(dataset).is_dir()


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks (what the catalog records for a shard, what a manifest records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def bytes_match(data: bytes | memoryview, size: int, sha256: str) -> bool:
    """``data`` is ``size`` bytes with this sha256: what a manifest or the catalog says an object holds."""
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256


def cache_root() -> Path:
    """Where remote catalogs (and, by default, shards) are cached: ``$SAGEPAIRS_CACHE`` or the XDG cache dir."""
    if os.environ.get("SAGEPAIRS_CACHE"):
        return Path(os.environ["SAGEPAIRS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sagepairs"


# -- credentials --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileCredentials:
    """obstore credential provider for ``AWS_PROFILE``: reads the shared credentials file when asked.

    Holds only the profile's name, so a pickled store carries no key.
    """

    profile: str

    def __call__(self) -> dict[str, Any]:
        section = _profile_section(_shared_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), self.profile)
        if not section or "aws_access_key_id" not in section:
            raise StorageError(f"AWS_PROFILE={self.profile}: no aws_access_key_id for that profile in "
                               f"{_shared_file('AWS_SHARED_CREDENTIALS_FILE', 'credentials')}")
        return {
            "access_key_id": section["aws_access_key_id"],
            "secret_access_key": section.get("aws_secret_access_key", ""),
            "token": section.get("aws_session_token"),
            "expires_at": None,
        }


def _shared_file(variable: str, name: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / ".aws" / name)


def _profile_section(path: Path, profile: str, prefixed: bool = False) -> dict[str, str]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return {}
    name = f"profile {profile}" if prefixed and profile != "default" else profile
    return dict(parser[name]) if parser.has_section(name) else {}


def _has_credentials_source() -> bool:
    """Whether anything would sign requests: keys, a profile, web identity or a container role."""
    return any(os.environ.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                                           "AWS_CONTAINER_CREDENTIALS_FULL_URI"))


# -- clients ------------------------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _client_options(plain_http: bool) -> dict[str, Any]:
    # Passing client options drops obstore's own reading of AWS_ALLOW_HTTP, so the choice is made here.
    return {"allow_http": plain_http, "connect_timeout": timedelta(seconds=5), "read_timeout": timedelta(seconds=60),
            "timeout": timedelta(minutes=30), "pool_idle_timeout": timedelta(seconds=30)}


def _retry_config() -> dict[str, Any]:
    return {"max_retries": 10, "retry_timeout": timedelta(seconds=_RETRY_TIMEOUT_S),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5), "base": 2}}


def _s3_store(url: str) -> S3Store:
    profile = os.environ.get("AWS_PROFILE")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
    settings: dict[str, Any] = {}
    provider = None
    if profile and not os.environ.get("AWS_ACCESS_KEY_ID"):
        provider = ProfileCredentials(profile)
        config = _profile_section(_shared_file("AWS_CONFIG_FILE", "config"), profile, prefixed=True)
        endpoint = endpoint or config.get("endpoint_url")
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION") and config.get("region"):
            settings["region"] = config["region"]
    if endpoint:
        settings["endpoint"] = endpoint
    if not _has_credentials_source() or _truthy(os.environ.get("AWS_SKIP_SIGNATURE")) or _truthy(
            os.environ.get("AWS_NO_SIGN_REQUEST")):
        settings["skip_signature"] = True
    if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "region" in settings):
        settings["region"] = "us-east-1"
    plain_http = bool(endpoint and endpoint.startswith("http://")) or _truthy(os.environ.get("AWS_ALLOW_HTTP"))
    return S3Store.from_url(url, client_options=_client_options(plain_http), retry_config=_retry_config(),
                            credential_provider=provider, **settings)


def _make_store(url: str) -> Any:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "s3":
        return _s3_store(url)
    if scheme in ("http", "https"):
        return HTTPStore.from_url(url, client_options=_client_options(scheme == "http"), retry_config=_retry_config())
    return LocalStore(Path(url).resolve(), mkdir=True)


_STORES: dict[str, Storage] = {}
_STORES_LOCK = threading.Lock()
_USED = False  # this process has made a client (its runtime does not survive fork)
_FORKED_AFTER_USE = False


@dataclass(frozen=True, eq=False)
class Storage:
    """The objects under one dataset URL (or local directory, for publishing to a web server's files).

    Keys are relative to the URL (``manifest.json``, ``shards/x-000001.tar``). Every failure is a StorageError
    naming the object's URL.
    """

    url: str
    client: Any

    def object_url(self, key: str) -> str:
        return f"{self.url}/{key}"

    # -- reads ----------------------------------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        try:
            return obstore.get(self.client, key).bytes().to_bytes()
        except Exception as exc:  # noqa: BLE001 - every client failure becomes one StorageError line
            raise self.explain(exc, key) from None

    async def read_async(self, key: str) -> bytes:
        try:
            result = await obstore.get_async(self.client, key)
            return (await result.bytes_async()).to_bytes()
        except Exception as exc:  # noqa: BLE001
            raise self.explain(exc, key) from None

    async def read_ranges_async(self, key: str, starts: Sequence[int], ends: Sequence[int],
                                coalesce: int) -> list[memoryview]:
        """The bytes of each [start, end) of one object, ranges closer than ``coalesce`` fetched together."""
        try:
            parts = await obstore.get_ranges_async(self.client, key, starts=list(starts), ends=list(ends),
                                                   coalesce=coalesce)
        except Exception as exc:  # noqa: BLE001
            raise self.explain(exc, key) from None
        return [memoryview(p) for p in parts]

    def size(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        try:
            return int(obstore.head(self.client, key)["size"])
        except (FileNotFoundError, NotFoundError):
            return None
        except Exception as exc:  # noqa: BLE001
            raise self.explain(exc, key) from None

    def listing(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix``: key -> size."""
        try:
            out = {}
            for batch in obstore.list(self.client, prefix=prefix or None, chunk_size=1000):
                for meta in batch:
                    out[str(meta["path"])] = int(meta["size"])
            return out
        except Exception as exc:  # noqa: BLE001
            raise self.explain(exc, prefix or "") from None

    def check_bucket(self) -> None:
        """Raises the one-line StorageError for a missing or forbidden bucket (a HEAD of a missing object cannot
        tell a missing bucket from a missing key); a web server has no buckets to check."""
        if not self.url.startswith("s3://"):
            return
        try:
            next(iter(obstore.list(self.client, chunk_size=1)), None)
        except Exception as exc:  # noqa: BLE001
            error = self.explain(exc, "")
            if "no such object" in str(error):  # a 404 to a bucket listing: no bucket, or not an S3 server at all
                raise StorageError(f"{self.url}: no such bucket, or the endpoint is not an S3 server; check the "
                                   "bucket name and AWS_ENDPOINT_URL") from None
            raise error from None

    # -- writes ---------------------------------------------------------------------------------------------
    async def write_async(self, key: str, data: bytes | Path, *, chunk_size: int = 16 << 20) -> None:
        """Upload (multipart above ``chunk_size``); the object appears whole or not at all."""
        try:
            await obstore.put_async(self.client, key, data, chunk_size=chunk_size, max_concurrency=4)
        except (BaseError, OSError, ValueError) as exc:  # the client's failures; a source's own error passes as is
            raise self.explain(exc, key) from None

    # -- errors ---------------------------------------------------------------------------------------------
    def explain(self, exc: BaseException, key: str) -> StorageError:
        """One line for a client failure: the object's URL and what to check (never the client's own text,
        which may quote request headers)."""
        where = self.object_url(key) if key else self.url
        text = str(exc)
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, (FileNotFoundError, NotFoundError)) or "NoSuchKey" in text or "404" in text:
            if "NoSuchBucket" in text:
                return StorageError(f"{where}: no such bucket; check the bucket name and AWS_ENDPOINT_URL")
            return StorageError(f"{where}: no such object; check the URL (was the dataset published there?)")
        if "NoSuchBucket" in text:
            return StorageError(f"{where}: no such bucket; check the bucket name and AWS_ENDPOINT_URL")
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or re.search(
                r"\b403\b|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|\b401\b", text):
            return StorageError(f"{where}: access denied; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                                "(a public bucket needs no keys)")
        if isinstance(exc, AlreadyExistsError):
            return StorageError(f"{where}: already exists")
        if re.search(r"connect|dns|resolve|refused|unreachable|timed? ?out|reset|broken pipe", text, re.IGNORECASE):
            return StorageError(f"{where}: cannot reach the server; check the URL, AWS_ENDPOINT_URL and the network")
        kind = type(exc).__name__ if isinstance(exc, BaseError) else "error"
        return StorageError(f"{where}: {kind} from the object store; check the URL and AWS_ENDPOINT_URL "
                            f"({_status_of(text)})")


def _status_of(text: str) -> str:
    """An HTTP status or S3 error code from a client's message, without the rest of it."""
    code = re.search(r"<Code>(\w+)</Code>|status(?: code)?:? (\d{3})|\b([45]\d\d)\b", text)
    return next((g for g in code.groups() if g), "no status") if code else "no status"


def storage(url: str | os.PathLike[str]) -> Storage:
    """This process's Storage for a dataset URL (or a local directory to publish into)."""
    key = check_url(url) if is_remote(url) else str(Path(url).resolve())
    if _FORKED_AFTER_USE:
        raise StorageError(
            f"{key}: this process was forked from one that had used object storage, and the client cannot work "
            "here; start DataLoader workers with multiprocessing_context='forkserver' (or 'spawn')"
        )
    global _USED
    _USED = True
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            try:
                client = _make_store(key)
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"{key}: cannot use this location: {type(exc).__name__}; check the URL and the "
                                   "AWS_* variables") from None
            store = _STORES[key] = Storage(key, client)
        return store


def forget_clients() -> None:
    """Drop this process's clients, so the next use reads the AWS variables again (tests change them)."""
    with _STORES_LOCK:
        _STORES.clear()


# -- one event loop per process for gathered requests --------------------------------------------------------------
_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_THREAD: threading.Thread | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP, _LOOP_THREAD
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            _LOOP_THREAD = threading.Thread(target=loop.run_forever, name="sagepairs-storage", daemon=True)
            _LOOP_THREAD.start()
            _LOOP = loop
        return _LOOP


def _close_at_exit() -> None:
    """Stop the loop and drop the clients before the interpreter goes: a client's runtime still delivering to
    Python while it finalizes aborts the process (1 exit in 40 did, after the work was done)."""
    global _LOOP, _LOOP_THREAD
    loop, thread = _LOOP, _LOOP_THREAD
    if loop is not None and thread is not None and thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
    _LOOP, _LOOP_THREAD = None, None
    _STORES.clear()
    gc.collect()


atexit.register(_close_at_exit)


def submit(coroutine: Coroutine[Any, Any, Any]) -> Future:
    """Start a coroutine on this process's storage loop; the Future gives its result (prefetching)."""
    return asyncio.run_coroutine_threadsafe(coroutine, _loop())


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on this process's storage loop and wait for it."""
    return submit(coroutine).result()


def _forget_after_fork() -> None:
    """A forked child starts with no clients and no loop: the parent's do not work there. Nor does a new client
    once the parent has used one (obstore's runtime hangs), so the child refuses in one line instead."""
    global _LOOP, _LOOP_THREAD, _STORES_LOCK, _LOOP_LOCK, _FORKED_AFTER_USE
    _FORKED_AFTER_USE = _USED
    _STORES.clear()
    _LOOP, _LOOP_THREAD = None, None
    _STORES_LOCK = threading.Lock()
    _LOOP_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
