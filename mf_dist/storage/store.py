"""The storage interface: every read and write of a data path outside ``mf_dist/storage`` goes here.

A *location* is a plain path, a ``file://`` URL or an object-store URL
(``s3://bucket/prefix``, ``gs://``, ``abfs://``, any fsspec protocol). Each
operation has two implementations, chosen by the location:

- **local filesystem**: exactly the calls mf-dist always made (``pq.read_table``
  on the path, ``np.save``, ``os.replace`` + ``fsync`` for atomic puts), so a
  local run reads and writes as before;
- **object store**: fsspec (:func:`mf_dist.storage.filesystems.resolve`), one
  request per whole object where possible.

The operations (with where the less common ones live):

==========================  ==================================================
write once                  :func:`write_bytes`, :func:`write_table`, :func:`save_array`, :func:`save_arrays`
read                        :func:`read_bytes`, :func:`read_table`, :func:`load_array`, :func:`load_arrays`
list                        :func:`list_names`
exists                      :func:`exists`
delete prefix               :func:`delete_prefix`
atomic small-object put     :func:`put_atomic` (``LATEST``: :mod:`mf_dist.storage.publish`)
lock                        :func:`mf_dist.storage.output_lock.exclusive_run`
==========================  ==================================================

Access pattern and library. Work-directory files (ratings blocks, tiles,
factor blocks, checkpoints) are written once and always read whole by one
task, so on an object store each is moved as one object: one GET
(``cat_file``) into memory and ``pyarrow.BufferReader`` / ``np.load`` on the
bytes, one PUT (``pipe_file``) of the serialised bytes. Measured on the
loopback moto server, best and median of 5, on a shared 2-core machine at
load 11-13 (ratings-block Parquet of 0.26 MB and 2.6 MB): reading, one GET
0.009-0.011 s / 0.015-0.030 s, ``pq.read_table`` through s3fs's file object
0.029 s / 0.034-0.042 s (a HEAD, then ranged GETs for the footer and the row
groups), through ``pyarrow.fs.S3FileSystem`` 0.015 s / 0.019 s; writing
(encoding included), one PUT 0.009 s / 0.107 s, through s3fs 0.009 s /
0.080 s, through pyarrow.fs 0.014 s / 0.106 s. So one GET is never slower
than s3fs's file object and on par with pyarrow's own S3 client (whose lead
on the larger block is within this machine's noise); fsspec is kept because
it alone covers every scheme (gs://, abfs://, any fsspec protocol) with the
same ``storage_options`` as the input side. Reads with a row filter (the id
maps read by export) go through ``pq.read_table(filesystem=...)`` so that
only the matching row groups travel.

Storage options. A run's ``storage_options`` are registered once per bucket
(:func:`storage_options_in_use`) and reach every Dask worker through
:class:`~mf_dist.storage.options_plugin.StorageOptionsPlugin`
(:func:`storage_options_shared`), so that records holding only a URL (the
stage records, a factor table's directory, a checkpoint) never carry them: secrets
stay out of every file and artifact. Workers otherwise use the credentials
of their own environment (the store's standard chain).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mf_dist.storage.filesystems import is_remote, join, local_path, resolve, root_of

__all__ = [
    "delete_prefix",
    "exists",
    "is_remote",
    "join",
    "list_names",
    "load_array",
    "load_arrays",
    "local_copy",
    "local_file_to_write",
    "make_dirs",
    "options_for",
    "put_atomic",
    "read_bytes",
    "read_schema",
    "read_table",
    "save_array",
    "save_arrays",
    "size",
    "storage_options_in_use",
    "storage_options_shared",
    "write_bytes",
    "write_table",
]

# Storage options by store root (``s3://bucket``), in this process.
_OPTIONS: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def storage_options_in_use(
    locations: Iterable[str], storage_options: Mapping[str, Any] | None
) -> Iterator[None]:
    """Use ``storage_options`` for the buckets of ``locations`` in this process during the block."""
    roots = {root_of(location) for location in locations if is_remote(location)}
    previous = {root: _OPTIONS.get(root) for root in roots}
    if storage_options:
        _OPTIONS.update({root: dict(storage_options) for root in roots})
    try:
        yield
    finally:
        for root, options in previous.items():
            if options is None:
                _OPTIONS.pop(root, None)
            else:
                _OPTIONS[root] = options


def options_for(location: str) -> dict[str, Any] | None:
    """The storage options registered in this process for the bucket of ``location`` (None: none)."""
    return _OPTIONS.get(root_of(location)) if is_remote(location) else None


@contextlib.contextmanager
def storage_options_shared(client: Any) -> Iterator[None]:
    """This process's storage options on every worker of ``client`` during the block (if there are any)."""
    if not _OPTIONS:
        yield
        return
    # Imported here: the CLI imports this module and must start without Dask.
    from mf_dist.storage.options_plugin import StorageOptionsPlugin

    client.register_plugin(StorageOptionsPlugin(_OPTIONS))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(StorageOptionsPlugin.name)


def _remote(location: str) -> tuple[Any, str]:
    return resolve(location, options_for(location))


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a file or object; :class:`FileNotFoundError` when absent."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        return filesystem.cat_file(path)
    return Path(local_path(location)).read_bytes()


def write_bytes(location: str | Path, data: bytes, *, durable: bool = False) -> None:
    """Write a file or object once (parent directories are created; ``durable``: fsync a local file)."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        filesystem.pipe_file(path, data)
        return
    path = Path(local_path(location))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())


def put_atomic(location: str | Path, data: bytes) -> None:
    """Replace a small file or object whole: readers see the old content or the new, never a mix.

    Local: a temporary file beside it, fsynced, then one ``os.replace``;
    object store: one put, which the store makes visible whole.
    """
    location = str(location)
    if is_remote(location):
        write_bytes(location, data)
        return
    path = Path(local_path(location))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def exists(location: str | Path) -> bool:
    """Whether a file, directory or object (or any object under the prefix) is there now."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        # Another process may have written it since this one listed the prefix.
        filesystem.invalidate_cache(path)
        return bool(filesystem.exists(path))
    return Path(local_path(location)).exists()


def list_names(location: str | Path) -> list[str]:
    """The names directly under a directory or prefix, sorted; empty when there is none."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        filesystem.invalidate_cache(path)
        try:
            entries = filesystem.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries})
    path = Path(local_path(location))
    return sorted(child.name for child in path.iterdir()) if path.is_dir() else []


def delete_prefix(location: str | Path) -> None:
    """Remove a file, a directory, or every object under a prefix; nothing to do when there is none."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        filesystem.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            filesystem.rm(path, recursive=True)
        filesystem.invalidate_cache(path)
        return
    path = Path(local_path(location))
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def make_dirs(location: str | Path) -> None:
    """Create a local directory (with parents); an object store has no directories to create."""
    location = str(location)
    if not is_remote(location):
        Path(local_path(location)).mkdir(parents=True, exist_ok=True)


def read_table(location: str | Path, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """A Parquet file (or local directory of files) as a table, optionally some columns or rows."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        if filters is not None:
            # Only the row groups that match travel. The size comes from the
            # store, not from a listing this worker cached before a rewrite.
            filesystem.invalidate_cache(path)
            return pq.read_table(path, filesystem=filesystem, columns=columns, filters=filters)
        return pq.read_table(pa.BufferReader(filesystem.cat_file(path)), columns=columns)
    return pq.read_table(local_path(location), columns=columns, filters=filters)


def read_schema(location: str | Path) -> pa.Schema:
    """The schema of a Parquet file (its footer only)."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        filesystem.invalidate_cache(path)
        return pq.read_schema(path, filesystem=filesystem)
    return pq.read_schema(local_path(location))


def write_table(table: pa.Table, location: str | Path, *, durable: bool = False, **options: Any) -> None:
    """Write ``table`` as one Parquet file (``options``: ``pq.write_table``'s, e.g. ``row_group_size``).

    ``durable``: fsync a local file (a published table's part); an object is whole once its put returns.
    """
    location = str(location)
    if is_remote(location):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, **options)
        write_bytes(location, buffer.getvalue().to_pybytes())
        return
    pq.write_table(table, local_path(location), **options)
    if durable:
        _fsync(local_path(location))


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def size(location: str | Path) -> int:
    """The size in bytes of a file or object; :class:`FileNotFoundError` when absent."""
    location = str(location)
    if is_remote(location):
        filesystem, path = _remote(location)
        filesystem.invalidate_cache(path)
        return int(filesystem.size(path))
    return Path(local_path(location)).stat().st_size


@contextlib.contextmanager
def local_file_to_write(location: str | Path) -> Iterator[str]:
    """A local path for a library that writes only to files (an ANN index); it becomes ``location``.

    Local: the path itself, fsynced when the block ends. Object store: a file in
    a temporary directory, uploaded as one object when the block ends without
    an error (and removed either way).
    """
    location = str(location)
    if not is_remote(location):
        yield local_path(location)
        _fsync(local_path(location))
        return
    with tempfile.TemporaryDirectory(prefix="mf-dist-upload-") as scratch:
        staged = str(Path(scratch) / location.rstrip("/").rsplit("/", 1)[-1])
        yield staged
        filesystem, path = _remote(location)
        filesystem.put_file(staged, path)


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[str]:
    """A local path holding the content of ``location`` during the block, for a library that reads only files.

    Local: the path itself. Object store: downloaded to a temporary file, removed
    when the block ends. :class:`FileNotFoundError` when absent.
    """
    location = str(location)
    if not is_remote(location):
        yield local_path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mf-dist-download-") as scratch:
        copy = str(Path(scratch) / location.rstrip("/").rsplit("/", 1)[-1])
        filesystem, path = _remote(location)
        filesystem.get_file(path, copy)
        yield copy


def save_array(location: str | Path, array: np.ndarray) -> None:
    """Write one array as ``.npy`` (``location`` ends in ``.npy``)."""
    location = str(location)
    if is_remote(location):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_bytes(location, buffer.getvalue())
        return
    np.save(local_path(location), array, allow_pickle=False)


def load_array(location: str | Path) -> np.ndarray:
    """Read an ``.npy`` file (never unpickling)."""
    location = str(location)
    if is_remote(location):
        return np.load(io.BytesIO(read_bytes(location)), allow_pickle=False)
    return np.load(local_path(location), allow_pickle=False)


def save_arrays(location: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write named arrays as one ``.npz`` file."""
    location = str(location)
    if is_remote(location):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(location, buffer.getvalue())
        return
    np.savez(local_path(location), **arrays)


def load_arrays(location: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` file written by :func:`save_arrays`, or None when there is none."""
    location = str(location)
    try:
        source: Any = io.BytesIO(read_bytes(location)) if is_remote(location) else local_path(location)
        with np.load(source, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except FileNotFoundError:
        return None
