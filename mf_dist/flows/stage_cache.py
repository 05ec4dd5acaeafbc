"""Which finished stages a run may reuse: stage keys, and stamps that say the work directory holds them.

A stage's key is a digest of everything its output depends on: the input
fingerprint (paths, sizes, modification times), the settings the stage
reads, the key of the stage before it, and the source of the code that
computes it. Prefect caches the stage's return value under that key (see
:class:`StageKeyPolicy`), but the return value only names files in the work
directory, and those may since have been deleted or overwritten by a run
with other settings. So a stage also leaves a *stamp*, ``<work>/_stages/<stage>.key``,
holding its key: removed when the stage starts, written when it has
finished. A cached result is used only when the stamp holds the same key;
otherwise the stage runs again and refreshes the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from mf_dist.storage.store import delete_prefix, is_remote, join, put_atomic, read_bytes

STAGES_DIR = "_stages"
KEY_PARAMETER = "stage_key"


@dataclass
class StageKeyPolicy(CachePolicy):
    """Prefect cache policy: the task's ``stage_key`` argument is its cache key."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        return inputs.get(KEY_PARAMETER)


@functools.cache
def code_version() -> str:
    """A digest of every Python source file of ``mf_dist`` (its flows included).

    Any code change invalidates every cached stage: coarser than per-function
    source hashes, but a change to a helper three calls down must not leave a
    stale result looking current.
    """
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, *parts: Any) -> str:
    """The key of ``stage`` given everything its output depends on (JSON-serialisable parts)."""
    payload = json.dumps([stage, code_version(), *parts], sort_keys=True, default=str)
    return f"mf-dist-{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


def result_storage(work_dir: str | Path) -> Path:
    """The directory of Prefect's stored stage results (small JSON records) for a work directory.

    Local: ``<work>/_stages/results``, beside the files the results name, so a
    cache entry is never found on a host that cannot see them. A work directory
    on an object store keeps them in this host's cache directory, keyed by
    the URL: a host without the record just runs the stage again, and the
    stamp (in the store) still decides whether a record may be used.
    """
    if not is_remote(str(work_dir)):
        return Path(work_dir).resolve() / STAGES_DIR / "results"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(work_dir).encode()).hexdigest()[:16]
    return cache / "mf-dist" / "stage-results" / digest


def stamp_path(work_dir: str | Path, stage: str) -> str:
    """Where ``stage``'s stamp lives (``work_dir`` is a path or a URL)."""
    return join(str(work_dir), STAGES_DIR, f"{stage}.key")


def stamp_matches(work_dir: str | Path, stage: str, key: str) -> bool:
    """Whether the work directory holds the finished output of ``stage`` for ``key``."""
    try:
        return read_bytes(stamp_path(work_dir, stage)).decode().strip() == key
    except FileNotFoundError:
        return False


def clear_stamp(work_dir: str | Path, stage: str) -> None:
    """Forget that ``stage`` finished: called before the stage touches its output."""
    delete_prefix(stamp_path(work_dir, stage))


def write_stamp(work_dir: str | Path, stage: str, key: str) -> None:
    """Record that ``stage`` finished for ``key``: written last, replaced whole (rename or one put)."""
    put_atomic(stamp_path(work_dir, stage), (key + "\n").encode())


def stored_result_is_json(storage: str | Path, key: str) -> bool:
    """Whether the result Prefect stored for ``key`` (if any) may be read back without unpickling.

    Prefect deserialises a stored result with the serializer its record
    names, not the one the task asks for: a record saying ``pickle`` (an
    older run's, or one planted in a shared work directory) would be
    unpickled on a cache hit. Such a record is treated as absent (the stage
    runs again and overwrites it). The check parses the record as JSON only.
    """
    path = Path(storage) / key
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    serializer = record.get("metadata", {}).get("serializer", {}) if isinstance(record, dict) else {}
    return isinstance(serializer, dict) and serializer.get("type") == "json"
