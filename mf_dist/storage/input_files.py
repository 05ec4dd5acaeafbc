"""Finding the input Parquet files and checking their schemas before any read.

Only Parquet footers are read here, so a wrong column or type is reported
with its file name before the cluster reads a single row.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mf_dist.errors import InputError
from mf_dist.storage.filesystems import check_bucket, full_url, is_remote, local_path, resolve, storage_errors

GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class InputColumns:
    """Which columns the input has, after checking every file's schema."""

    user: str
    item: str
    rating: str | None
    timestamp: str | None
    user_id_type: pa.DataType
    item_id_type: pa.DataType

    @property
    def names(self) -> list[str]:
        return [c for c in (self.user, self.item, self.rating, self.timestamp) if c is not None]


def list_input_files(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The Parquet files of ``path``: a file, a directory (recursively) or a glob.

    Names starting with ``.`` or ``_`` (``_SUCCESS``, ``_metadata``, ``.crc``)
    are skipped, as Spark and Dask do. The list is sorted, so it does not
    depend on the order the filesystem lists files in. ``path`` may be a URL
    (``s3://bucket/ratings/``); then the files are URLs too.
    """
    if is_remote(path):
        return _list_remote(path, storage_options)
    path = local_path(path)
    if GLOB_CHARACTERS & set(path):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    elif os.path.isdir(path):
        root = Path(path)
        files = [
            str(f)
            for f in root.rglob("*")
            if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(root).parts)
        ]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise InputError("input path does not exist", file=path)
    files = sorted(files)
    if not files:
        raise InputError("no Parquet files found", file=path)
    return files


def _list_remote(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    filesystem, root = resolve(url, storage_options)
    with storage_errors(url, InputError):
        if GLOB_CHARACTERS & set(root):
            matches = filesystem.glob(root, detail=True)
            found = [p for p, info in matches.items() if info.get("type") == "file"]
        elif filesystem.isfile(root):
            found = [root]
        elif filesystem.isdir(root):
            base = root.rstrip("/")
            found = [
                p
                for p in filesystem.find(base)
                if not any(part.startswith((".", "_")) for part in p[len(base) :].strip("/").split("/"))
            ]
        else:
            check_bucket(url, storage_options, InputError)  # a missing bucket says so
            raise InputError("input path does not exist", file=url)
    files = sorted(full_url(filesystem, p) for p in found)
    if not files:
        raise InputError("no Parquet files found", file=url)
    return files


def _id_kind(data_type: pa.DataType) -> str | None:
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_integer(data_type):
        return "integer"
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "string"
    return None


def check_schemas(
    files: list[str],
    *,
    user_col: str,
    item_col: str,
    rating_col: str,
    timestamp_col: str,
    storage_options: dict[str, Any] | None = None,
) -> InputColumns:
    """Check every file's footer; return the columns the pipeline will read.

    Raises :class:`InputError` naming the file and column for an unreadable
    file, a missing id column, an id that is neither integer nor string, ids
    whose kind differs between files, or a non-numeric rating or timestamp.
    The rating and timestamp columns are optional, but all files must agree.
    """
    schemas: list[pa.Schema] = []
    for file in files:
        try:
            if is_remote(file):
                filesystem, inside = resolve(file, storage_options)
                with storage_errors(file, InputError), filesystem.open(inside, "rb") as handle:
                    schemas.append(pq.read_schema(handle))
            else:
                schemas.append(pq.read_schema(file))
        except (pa.ArrowInvalid, OSError) as exc:
            if not _starts_like_parquet(file, storage_options):
                raise InputError(
                    "not a Parquet file (it does not begin with the Parquet magic bytes PAR1); "
                    "remove it from the input directory or point --input at the Parquet files only",
                    file=file,
                ) from exc
            raise InputError(
                f"not a readable Parquet file (truncated or corrupt?): {exc}", file=file
            ) from exc

    id_types: dict[str, tuple[pa.DataType, str]] = {}
    for file, schema in zip(files, schemas, strict=True):
        for column, flag in ((user_col, "--user-col"), (item_col, "--item-col")):
            if column not in schema.names:
                raise InputError(
                    f"missing id column; the file has columns {schema.names} (choose one with {flag})",
                    file=file,
                    column=column,
                )
            data_type = schema.field(column).type
            kind = _id_kind(data_type)
            if kind is None:
                raise InputError(
                    f"ids must be integers or strings, found {data_type}", file=file, column=column
                )
            if column in id_types and _id_kind(id_types[column][0]) != kind:
                first_type, first_file = id_types[column]
                raise InputError(
                    f"ids are {data_type} here but {first_type} in {first_file}: "
                    "all files of one dataset must share a schema",
                    file=file,
                    column=column,
                )
            id_types.setdefault(column, (data_type, file))

    optional: dict[str, str | None] = {}
    for column, numeric in ((rating_col, _is_rating_type), (timestamp_col, _is_timestamp_type)):
        present = [column in schema.names for schema in schemas]
        if any(present) and not all(present):
            with_file = files[present.index(True)]
            without_file = files[present.index(False)]
            raise InputError(
                f"column is in {with_file} but not here: all files of one dataset must share a schema",
                file=without_file,
                column=column,
            )
        if all(present):
            for file, schema in zip(files, schemas, strict=True):
                data_type = schema.field(column).type
                if not numeric(data_type):
                    raise InputError(f"must be numeric, found {data_type}", file=file, column=column)
        optional[column] = column if all(present) else None

    def normalised(data_type: pa.DataType) -> pa.DataType:
        return pa.int64() if _id_kind(data_type) == "integer" else pa.string()

    return InputColumns(
        user=user_col,
        item=item_col,
        rating=optional[rating_col],
        timestamp=optional[timestamp_col],
        user_id_type=normalised(id_types[user_col][0]),
        item_id_type=normalised(id_types[item_col][0]),
    )


def _starts_like_parquet(file: str, storage_options: dict[str, Any] | None = None) -> bool:
    try:
        filesystem, inside = resolve(file, storage_options)
        with filesystem.open(inside, "rb") as handle:
            return handle.read(4) == b"PAR1"
    except OSError:
        return False


def _is_rating_type(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)


def _is_timestamp_type(data_type: pa.DataType) -> bool:
    return _is_rating_type(data_type) or pa.types.is_timestamp(data_type) or pa.types.is_date(data_type)


def input_fingerprint(files: list[str], storage_options: dict[str, Any] | None = None) -> str:
    """A digest of the input files' paths, sizes and modification times (ETags on an object store)."""
    digest = hashlib.sha256()
    for file in files:
        if is_remote(file):
            filesystem, inside = resolve(file, storage_options)
            with storage_errors(file, InputError):
                info = filesystem.info(inside)
            version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
            digest.update(f"{file}\0{info.get('size')}\0{version}\n".encode())
            continue
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
