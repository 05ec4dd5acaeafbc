"""Paths and URLs: which filesystem a location is on, and one-line errors for the ones that fail.

Every path mf-dist reads or writes may be a plain local path, a ``file://``
URL or an object-store URL (``s3://bucket/prefix``, ``gs://``, ``abfs://``,
any fsspec protocol whose package is installed). :func:`resolve` turns one
into an fsspec filesystem and the path on it; the local filesystem keeps the
code paths it always had (renames, ``os.replace``, ``fsync``), so a local run
behaves exactly as before.

Why fsspec rather than ``pyarrow.fs``: measured reading Parquet input from a
loopback S3 server (moto), list + footers + rows, best of 5 (3 for the large
one), on a shared 2-core machine: 8 files / 2,854 rows, s3fs 0.24 s and
pyarrow.fs.S3FileSystem 0.15 s; 4 files / 2,000,000 rows, s3fs 0.44 s and
pyarrow.fs 0.34 s (medians swing by several times with the machine's load).
pyarrow.fs is faster, mostly by making fewer requests per file (s3fs sends a
second HEAD before each ranged GET), but the gap is a fraction of a second
per file next to a cluster's start-up and an ingest's shuffle. fsspec is used
because it alone covers every scheme of the issue (gs://, abfs:// and any
other fsspec protocol) through one interface, takes the same
``storage_options`` as Dask's and pandas' readers, is what Dask's
``read_parquet`` hands its workers, and offers conditional creates (s3fs
``mode="create"``, S3 ``If-None-Match: *``). pyarrow reads through it
(``filesystem=`` accepts an fsspec filesystem).

Credentials come from each store's standard chain (for S3: the
``AWS_*`` environment variables, ``~/.aws``, an instance role;
``AWS_ENDPOINT_URL`` selects another S3-compatible server) and from the run
config's ``storage_options``. Workers resolve their own filesystem from the
URL and the same ``storage_options``; the options are never logged, and
secret-looking ones are masked in manifests (:func:`redacted_options`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from mf_dist.errors import ConfigError, MfDistError

# The extra that installs each object store's fsspec package (pyproject.toml).
EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
    "az": ("adlfs", "azure"),
}
LOCAL_SCHEMES = {"file", "local"}
# Object stores: the first part of the path is a bucket (or container).
BUCKET_SCHEMES = set(EXTRAS)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")

# Keys of storage_options whose values are not written anywhere (manifests, logs).
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "connection", "session")


def scheme_of(path: object) -> str | None:
    """The URL scheme of ``path`` (lower case), or None for a plain path."""
    match = _URL.match(str(path))
    return match.group(1).lower() if match else None


def is_remote(path: object) -> bool:
    """Whether ``path`` is a URL of something other than the local filesystem."""
    scheme = scheme_of(path)
    return scheme is not None and scheme not in LOCAL_SCHEMES


def local_path(path: object) -> str:
    """A plain path for a plain path or a ``file://`` URL."""
    text = str(path)
    if scheme_of(text) in LOCAL_SCHEMES:
        return _URL.match(text).group(2)  # type: ignore[union-attr]
    return text


def check_url(url: str) -> None:
    """Raise :class:`ConfigError` for a URL that cannot name a location: unknown scheme, no bucket.

    Plain paths and ``file://`` URLs always pass; nothing is contacted.
    """
    scheme = scheme_of(url)
    if scheme is None or scheme in LOCAL_SCHEMES:
        return
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise ConfigError(
            f"{url}: unknown storage scheme {scheme + '://'!r}; use a local path, file://, s3://, gs://, "
            "abfs:// or another fsspec protocol"
        )
    if scheme in BUCKET_SCHEMES and not bucket_of(url):
        raise ConfigError(f"{url}: no bucket in the URL; write it as {scheme}://<bucket>/<prefix>")


def bucket_of(url: str) -> str:
    """The bucket (container) of an object-store URL: the first part of its path."""
    match = _URL.match(url)
    rest = match.group(2) if match else url
    return rest.split("/", 1)[0].split("@", 1)[0]


def root_of(url: str) -> str:
    """``scheme://bucket`` of an object-store URL (the unit its storage options apply to)."""
    return f"{scheme_of(url)}://{bucket_of(url)}"


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of a path or URL; a plain path is on the local filesystem.

    Raises :class:`ConfigError` for an unknown scheme, a URL without a bucket,
    or a scheme whose package is not installed (naming the extra to install).
    """
    import fsspec.core

    check_url(url)
    scheme = scheme_of(url)
    try:
        if scheme is None:
            return fsspec.core.url_to_fs(url)
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        package, extra = EXTRAS.get(scheme or "", ("its fsspec package", ""))
        install = f"pip install 'mf-dist[{extra}]'" if extra else f"install {package}"
        raise ConfigError(f"{url}: {scheme}:// needs {package}, which is not installed: {install}") from exc
    except ValueError as exc:
        raise ConfigError(f"{url}: {exc}") from exc


def full_url(filesystem: Any, path: str) -> str:
    """``path`` on ``filesystem`` as the URL that names it (a plain path when local)."""
    if is_local(filesystem):
        return path
    return filesystem.unstrip_protocol(path)


def is_local(filesystem: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(filesystem, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URL or a path."""
    return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])


def common_prefix(urls: list[str]) -> str:
    """The longest common ``/``-separated prefix of URLs (``os.path.commonpath`` would eat ``//``)."""
    parts = [url.split("/") for url in urls]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return "/".join(common)


def describe_storage_error(error: BaseException, url: str) -> str | None:
    """A one-line explanation of an object store's error about ``url``, or None for any other error."""
    name = type(error).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return (
            f"{url}: no credentials for {scheme_of(url)}://; set them in the store's standard way "
            "(for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role)"
        )
    if isinstance(error, PermissionError):
        return f"{url}: access denied; these credentials may not use this bucket or prefix"
    message = str(error)
    if "NoSuchBucket" in message or "bucket does not exist" in message.lower():
        return f"{url}: bucket {bucket_of(url)!r} does not exist"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
        return f"{url}: cannot reach the storage endpoint ({error})"
    return None


@contextlib.contextmanager
def storage_errors(url: str, error_type: type[MfDistError]) -> Iterator[None]:
    """Turn an object store's credential, permission and bucket errors into ``error_type`` (one line)."""
    try:
        yield
    except MfDistError:
        raise
    except Exception as exc:
        message = describe_storage_error(exc, url)
        if message is None:
            raise
        raise error_type(message) from exc


def check_bucket(url: str, storage_options: Mapping[str, Any] | None, error_type: type[MfDistError]) -> None:
    """Raise ``error_type`` when the bucket of an object-store URL is missing or cannot be used."""
    if scheme_of(url) not in BUCKET_SCHEMES:
        return
    filesystem, _ = resolve(url, storage_options)
    bucket = bucket_of(url)
    with storage_errors(url, error_type):
        try:
            filesystem.ls(bucket, detail=False)
        except FileNotFoundError as exc:
            raise error_type(f"{url}: bucket {bucket!r} does not exist") from exc


def redacted_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` with the values of secret-looking keys replaced, for manifests and logs."""
    return {
        key: "***" if any(word in key.lower() for word in _SECRET_WORDS) else value
        for key, value in storage_options.items()
    }
