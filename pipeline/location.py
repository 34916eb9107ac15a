"""Where data lives: a local path, or a folder in object storage given as a URL. The only
module that talks to ``obstore``.

``as_location("s3://bucket/prefix")`` is an ``ObjectPath``: the part of ``pathlib.Path`` the
pipeline uses (``/``, ``parent``, ``name``, ``exists``, ``is_dir``, ``iterdir``, ``glob``,
``read_bytes``, ``write_bytes``, ``open``), over S3, GCS or Azure through obstore, plus
conditional writes (create-if-absent, replace-if-unchanged) for leases. A local path (or a
``file://`` URL) stays a ``pathlib.Path``, so everything that reads or writes a location takes
either. Zarr reaches the same objects through ``zarr.storage.ObjectStore`` (``obstore_store``)
and pyarrow through ``arrow_filesystem``, so one client and one configuration serve stores,
tables, leases and data.

Why obstore (``bench/storage.py`` measures it against fsspec/s3fs): one Rust client with its
own connection pool and concurrency, which zarr 3 drives directly; conditional puts that S3,
GCS and Azure all honour; and configuration from each provider's standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, profiles
and instance credentials; ``GOOGLE_*``; ``AZURE_*``). ``--storage-option KEY=VALUE`` adds
obstore configuration keys (``endpoint``, ``region``, ``skip_signature``...) or client options
(``allow_http``, ``timeout``...); an ``http://`` endpoint turns ``allow_http`` on by itself.
"""
from __future__ import annotations

import datetime
import fnmatch
import functools
import io
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

import obstore
import obstore.store

from .errors import StoreError

OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss")
_CLIENT_OPTIONS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
                   "http1_only", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host", "proxy_url",
                   "timeout", "user_agent"}
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT")
# fsspec/s3fs and boto spellings a user may bring, as obstore's keys
_OPTION_ALIASES = {"endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key",
                   "token": "session_token", "region_name": "region", "aws_access_key_id": "access_key_id",
                   "aws_secret_access_key": "secret_access_key", "aws_session_token": "session_token",
                   "aws_endpoint": "endpoint", "aws_endpoint_url": "endpoint", "aws_region": "region",
                   "aws_allow_http": "allow_http"}
_SCHEMES = {"s3a": "s3", "gcs": "gs", "azure": "az"}  # spellings of one scheme, as obstore names it
# the providers' standard variables, which a driver hands to its workers (storage_environment)
_PROVIDER_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")


def is_url(value: Any) -> bool:
    return isinstance(value, str) and "://" in value


def as_location(value: Any, options: Mapping[str, Any] | None = None) -> "Path | ObjectPath":
    """A ``Path`` for a local path or ``file://`` URL, an ``ObjectPath`` for an object-storage
    URL (with ``options``); other schemes are refused by name."""
    if isinstance(value, ObjectPath):
        return value.with_options(options) if options else value
    if isinstance(value, Path):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    if not is_url(text):
        return Path(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return Path(urlparse(text).path)
    if scheme not in OBJECT_SCHEMES:
        raise StoreError(f"{text}: unknown storage scheme {scheme!r}; use a local path, file://, s3://, gs:// or az://")
    return ObjectPath(text, options)


def is_local(location: Any) -> bool:
    return not isinstance(location, ObjectPath)


class ObjectPath:
    """A key prefix in a bucket, used like a folder (or, for one object, like a file)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        parsed = urlparse(url)
        if not parsed.netloc:
            raise StoreError(f"{url}: no bucket in the URL; write {parsed.scheme}://BUCKET/PREFIX")
        self.scheme, self.bucket = _SCHEMES.get(parsed.scheme.lower(), parsed.scheme.lower()), parsed.netloc
        self.key = str(PurePosixPath("/" + parsed.path.strip("/")))[1:]  # no leading or trailing slash
        self.options: tuple[tuple[str, str], ...] = tuple(sorted(
            (_OPTION_ALIASES.get(str(k), str(k)), str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in (options or {}).items()))

    # -- the path part ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (str(self), self.options) == (str(other), other.options)

    def __lt__(self, other: "ObjectPath") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash((str(self), self.options))

    def __truediv__(self, other: str | os.PathLike) -> "ObjectPath":
        return self._at(f"{self.key}/{os.fspath(other)}".strip("/"))

    def _at(self, key: str) -> "ObjectPath":
        out = object.__new__(ObjectPath)
        out.scheme, out.bucket, out.options = self.scheme, self.bucket, self.options
        out.key = str(PurePosixPath("/" + key))[1:]
        return out

    def with_options(self, options: Mapping[str, Any] | None) -> "ObjectPath":
        return ObjectPath(str(self), {**dict(self.options), **dict(options or {})})

    name = property(lambda self: PurePosixPath(self.key).name)
    stem = property(lambda self: PurePosixPath(self.key).stem)
    suffix = property(lambda self: PurePosixPath(self.key).suffix)
    parent = property(lambda self: self._at(str(PurePosixPath(self.key).parent).lstrip(".")))

    # -- the client ------------------------------------------------------------------------------
    @property
    def _bucket_store(self) -> Any:
        _probe(self.scheme, self.bucket, self.options)
        return _client(self.scheme, self.bucket, self.options)

    def obstore_store(self) -> Any:
        """An obstore store rooted at this prefix (what ``zarr.storage.ObjectStore`` wraps)."""
        _probe(self.scheme, self.bucket, self.options)
        return _client(self.scheme, self.bucket, self.options, self.key)

    def arrow_filesystem(self) -> tuple[Any, str]:
        """(a pyarrow filesystem over the same client, this location's path in it)."""
        _probe(self.scheme, self.bucket, self.options)
        import pyarrow.fs
        from obstore.fsspec import FsspecStore

        config, client = _split_options(self.scheme, self.options)
        fs = FsspecStore(_fsspec_protocol(self.scheme), config=config or None, client_options=client or None)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), f"{self.bucket}/{self.key}".rstrip("/")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self._bucket_store, *args, **kwargs)
        except (FileNotFoundError, StoreError):
            raise
        except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
            raise
        except Exception as exc:  # credentials, network, a missing bucket: say where
            raise StoreError(f"{what} {self} failed: {_first_line(exc)}") from exc

    # -- reading -----------------------------------------------------------------------------------
    def head(self) -> dict[str, Any] | None:
        """The object's metadata (size, e_tag...), None if there is no object at this key."""
        try:
            return self._call("reading", obstore.head, self.key)
        except FileNotFoundError:
            return None

    def is_file(self) -> bool:
        return bool(self.key) and self.head() is not None

    def is_dir(self) -> bool:
        """True when objects exist under this prefix (object storage has no empty folders;
        some servers list the prefixes of deleted objects, so objects are what counts)."""
        first = self._call("listing", lambda store, prefix: next(iter(obstore.list(store, prefix, chunk_size=1)), []),
                           self.key or None)
        return any(meta["path"] != self.key for meta in first)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator["ObjectPath"]:
        listed = self._call("listing", obstore.list_with_delimiter, self.key or None)
        for prefix in listed["common_prefixes"]:
            yield self._at(prefix)
        for meta in listed["objects"]:
            if meta["path"] != self.key:
                yield self._at(meta["path"])

    def keys(self) -> list[str]:
        """Every object under this prefix, as keys relative to it."""
        prefix = f"{self.key}/" if self.key else ""
        listed = self._call("listing", lambda store, key: [m["path"] for batch in obstore.list(store, key) for m in batch],
                            self.key or None)
        return sorted(path[len(prefix):] for path in listed)

    def rglob(self, pattern: str) -> Iterator["ObjectPath"]:
        return self.glob(f"**/{pattern}")

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Objects (not folders) whose key below this prefix matches ``pattern``; ``**/``
        matches any depth, ``*`` stays within one level."""
        deep = pattern.startswith("**/")
        tail = pattern[3:] if deep else pattern
        for rel in self.keys():
            name = rel.rsplit("/", 1)[-1] if deep else rel
            if fnmatch.fnmatchcase(name, tail) and (deep or rel.count("/") == tail.count("/")):
                yield self / rel

    def read_bytes(self) -> bytes:
        return self.read_versioned()[0]

    def read_versioned(self) -> tuple[bytes, str | None]:
        """The object and its entity tag, from one request (what a conditional write names)."""
        try:
            got = self._call("reading", obstore.get, self.key)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self} does not exist") from exc
        return bytes(got.bytes()), got.meta.get("e_tag")

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> io.BytesIO:
        if mode != "rb":
            raise ValueError(f"{self}: objects are opened for reading ('rb') only")
        return io.BytesIO(self.read_bytes())

    # -- writing -----------------------------------------------------------------------------------
    def write_bytes(self, data: bytes, *, if_absent: bool = False, if_etag: str | None = None) -> str | None:
        """Put the object in one request (atomic: readers see the old object or the new one).
        ``if_absent``: only if no object exists; ``if_etag``: only if the object is still that
        version. A failed condition is ``FileExistsError``. Returns the new entity tag."""
        mode = "create" if if_absent else {"e_tag": if_etag} if if_etag else "overwrite"
        try:
            return self._call("writing", obstore.put, self.key, data, mode=mode).get("e_tag")
        except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError) as exc:
            raise FileExistsError(f"{self} was created or changed by another writer") from exc
        except FileNotFoundError as exc:  # replace-if-unchanged of an object that was removed
            raise FileExistsError(f"{self} was removed by another writer") from exc

    def write_text(self, text: str, encoding: str = "utf-8") -> str | None:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object lies under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and self.head() is None:
            raise FileNotFoundError(f"{self} does not exist")
        self._call("deleting", obstore.delete, self.key)

    def mirror_to(self, target: "ObjectPath", last: Callable[[str], bool] = lambda rel: False) -> None:
        """Make ``target`` hold exactly this prefix's objects (object storage has no rename):
        objects only it holds are removed, then every object here is copied over on the server,
        those ``last`` picks after the others."""
        mine = self.keys()
        for rel in set(target.keys()) - set(mine):
            (target / rel).unlink(missing_ok=True)
        for rel in sorted(mine, key=last):
            self._call("copying", obstore.copy, f"{self.key}/{rel}", f"{target.key}/{rel}")

    def remove_tree(self) -> None:
        keys = [f"{self.key}/{rel}".strip("/") for rel in self.keys()]
        for start in range(0, len(keys), 1000):
            self._call("deleting", obstore.delete, keys[start:start + 1000])

    def check_reachable(self) -> None:
        """List the bucket once, so a wrong endpoint, bucket or credential fails before any
        work, naming the URL."""
        self._call("listing", obstore.list_with_delimiter, self.key or None)

    def __reduce__(self) -> tuple[Any, ...]:
        return ObjectPath, (str(self), dict(self.options))


async def put_object_async(store: Any, key: str, data: Any) -> None:
    """Put one object in a single request (a feature chunk of several MB too: obstore would
    otherwise split it into a multipart upload of four requests or more)."""
    await obstore.put_async(store, key, data, use_multipart=False)


def storage_environment() -> dict[str, str]:
    """This process's object-storage variables (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``), for
    worker processes elsewhere to open URLs as this one does."""
    return {k: v for k, v in os.environ.items() if k.startswith(_PROVIDER_ENV_PREFIXES)}


def remove_tree(location: Path | ObjectPath) -> None:
    """Remove a folder (or prefix) and everything under it; nothing if it does not exist."""
    if isinstance(location, ObjectPath):
        location.remove_tree()
    else:
        shutil.rmtree(location, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fsspec_protocol(scheme: str) -> str:
    return {"abfss": "abfs"}.get(scheme, scheme)


def _split_options(scheme: str, options: tuple[tuple[str, str], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(provider configuration, client options) from ``--storage-option`` pairs and the
    environment: an ``http://`` endpoint needs ``allow_http``."""
    config = {k: v for k, v in options if k not in _CLIENT_OPTIONS}
    client = {k: v for k, v in options if k in _CLIENT_OPTIONS}
    if scheme == "s3":
        endpoint = config.get("endpoint") or next((os.environ[v] for v in _ENDPOINT_ENV if os.environ.get(v)), "")
        if str(endpoint).startswith("http://"):
            client.setdefault("allow_http", "true")
    return config, client


PROBE_SECONDS = 5  # the first request to a bucket: an endpoint that does not answer by then is refused


def _endpoint_source(scheme: str, options: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(the endpoint a client of ``scheme`` talks to, what sets it), for messages."""
    config = dict(options)
    if config.get("endpoint"):
        return config["endpoint"], "--storage-option endpoint=... (storage_options: endpoint)"
    if scheme == "s3":
        found = next((v for v in _ENDPOINT_ENV if os.environ.get(v)), None)
        if found:
            return os.environ[found], found
        return "the provider's default endpoint", "AWS_ENDPOINT_URL"
    variable = {"gs": "GOOGLE_SERVICE_ACCOUNT / GOOGLE_*", "az": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_*"}
    return "the provider's default endpoint", variable.get(scheme, "the provider's variables")


@functools.lru_cache(maxsize=64)
def _probe(scheme: str, bucket: str, options: tuple[tuple[str, str], ...]) -> None:
    """List ``bucket`` once per process with a short timeout and no retries, so an endpoint
    that does not answer fails in seconds, in one line naming the URL and the variable that
    sets it; the long retries of the regular client stay for transient errors during a run.
    Answers other than silence (credentials, a missing bucket) are left to the regular calls,
    which name them."""
    config, client = _split_options(scheme, options)
    client = {**client, "timeout": f"{PROBE_SECONDS}s", "connect_timeout": f"{PROBE_SECONDS}s"}
    url = f"{scheme}://{bucket}"
    try:
        store = obstore.store.from_url(url, config=config or None, client_options=client, retry_config={
            "max_retries": 0, "retry_timeout": datetime.timedelta(seconds=PROBE_SECONDS)})
        obstore.list_with_delimiter(store, None)
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, obstore.exceptions.GenericError) and ("error sending request" in text or "timed out" in text
                                                                 or "onnect" in text):
            endpoint, source = _endpoint_source(scheme, options)
            raise StoreError(f"{url}: no answer from {endpoint} within {PROBE_SECONDS} s; check the address "
                             f"(set by {source})") from None


@functools.lru_cache(maxsize=64)
def _client(scheme: str, bucket: str, options: tuple[tuple[str, str], ...], prefix: str = "") -> Any:
    """One obstore client per (bucket, options, prefix) and process: its connection pool is reused."""
    config, client = _split_options(scheme, options)
    url = f"{scheme}://{bucket}/{prefix}".rstrip("/")
    try:
        return obstore.store.from_url(url, config=config or None, client_options=client or None)
    except Exception as exc:
        raise StoreError(f"{url}: cannot configure the object store client: {_first_line(exc)}") from exc
