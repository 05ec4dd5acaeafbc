"""One storage interface: no file operation on a data path outside ``mf_dist/storage``.

Every read and write of the input, the work directory and the output goes
through :mod:`mf_dist.storage` (``store.py``: write once, read, list,
exists, delete prefix, atomic small-object put; ``output_lock.py``: the
lock; ``publish.py``: runs and ``LATEST``), which has a local-filesystem and
an object-store implementation. This test scans the source of every other
module (with ``ast``) for ``open()``, ``os.*`` file calls, ``shutil`` and
``pathlib`` file methods. The few modules allowed to use them are listed
below, each with the reason; none of them touches a run's data path.
"""

from __future__ import annotations

import ast

from tests.support.paths import REPO

PACKAGE = REPO / "mf_dist"

# module (or package, ending in /) → why its file operations are not on a data path.
ALLOWED = {
    "mf_dist/bench/": (
        "the benchmark harness: its own generated data, reference implementations and temporary "
        "directories (it runs the pipeline itself through the CLI)"
    ),
    "mf_dist/cli.py": "`mf-dist demo` generates its input into a local directory before the run",
    "mf_dist/config.py": "reads the TOML config file the user names",
    "mf_dist/flows/serve.py": "reads the Prefect deployment file (prefect.yaml)",
    "mf_dist/flows/stage_cache.py": (
        "hashes mf-dist's own source files (the code version); checks Prefect's stored result "
        "records on the flow host"
    ),
    "mf_dist/flows/artifacts.py": "reads back the PNG the plotting library drew in a temporary directory",
    "mf_dist/commands/recommend.py": "reads the list of user ids named by --users",
}

OS_FILE_CALLS = {
    "open", "remove", "unlink", "rename", "replace", "makedirs", "mkdir", "listdir", "scandir",
    "rmdir", "removedirs", "fsync", "walk", "stat", "truncate", "ftruncate", "pwrite", "link", "symlink",
}  # fmt: skip
OS_PATH_CALLS = {"exists", "isdir", "isfile", "getsize", "getmtime"}
PATH_METHODS = {
    "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmdir", "iterdir",
    "glob", "rglob", "exists", "is_dir", "is_file", "open", "stat", "touch",
}  # fmt: skip
# Path.rename(target) / Path.replace(target): one positional argument (str.replace and
# DataFrame.rename(columns=...) take two or keywords).
PATH_ONE_ARGUMENT_METHODS = {"rename", "replace"}


def file_operations(source: str) -> list[tuple[int, str]]:
    """(line, call) of each file operation in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        call = None
        if isinstance(function, ast.Name) and function.id == "open":
            call = "open()"
        elif isinstance(function, ast.Attribute):
            owner = function.value
            name = function.attr
            if isinstance(owner, ast.Name) and owner.id == "os" and name in OS_FILE_CALLS:
                call = f"os.{name}()"
            elif isinstance(owner, ast.Name) and owner.id == "shutil":
                call = f"shutil.{name}()"
            elif (
                isinstance(owner, ast.Attribute)
                and isinstance(owner.value, ast.Name)
                and owner.value.id == "os"
                and owner.attr == "path"
                and name in OS_PATH_CALLS
            ):
                call = f"os.path.{name}()"
            elif name in PATH_METHODS or (
                name in PATH_ONE_ARGUMENT_METHODS and len(node.args) == 1 and not node.keywords
            ):
                call = f".{name}()"
        if call is not None:
            found.append((node.lineno, call))
    return found


def allowance(module: str) -> str | None:
    return next((reason for prefix, reason in ALLOWED.items() if module.startswith(prefix)), None)


def test_no_file_operation_outside_the_storage_package():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(REPO).as_posix()
        if module.startswith("mf_dist/storage/") or allowance(module):
            continue
        offending += [f"{module}:{line}: {call}" for line, call in file_operations(path.read_text())]
    assert offending == [], (
        "file operations outside mf_dist/storage (use mf_dist.storage.store):\n" + "\n".join(offending)
    )


def test_every_allowance_is_still_needed():
    for prefix in ALLOWED:
        paths = sorted(PACKAGE.parent.glob(prefix + "**/*.py")) if prefix.endswith("/") else [REPO / prefix]
        assert any(file_operations(path.read_text()) for path in paths), f"{prefix}: no longer needed"


def test_the_scan_finds_each_kind_of_file_operation():
    source = (
        "import os, shutil\n"
        "open('x')\n"
        "os.replace('a', 'b')\n"
        "shutil.rmtree('d')\n"
        "os.path.exists('p')\n"
        "path.read_text()\n"
        "path.rename(other)\n"
        "text.replace('a', 'b')\n"
        "frame.rename(columns={})\n"
    )
    assert [call for _, call in file_operations(source)] == [
        "open()",
        "os.replace()",
        "shutil.rmtree()",
        "os.path.exists()",
        ".read_text()",
        ".rename()",
    ]
