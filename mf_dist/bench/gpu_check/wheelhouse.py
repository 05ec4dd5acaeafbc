"""The wheelhouse that travels with the working tree: what it holds, for which Pythons, and whether
it fits the budget of what a device machine is sent (the tree and the carried paths, 64 MiB).

Standard library only, and runnable as a script (``python3 mf_dist/bench/gpu_check/wheelhouse.py
WHEELHOUSE --repo REPO``) by a Python with nothing installed: deploy/gpu/build-wheelhouse.sh
writes the wheelhouse's ``MANIFEST.json`` with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MEBIBYTE = 1024 * 1024
BUDGET_BYTES = 64 * MEBIBYTE
"""What a device machine is sent: the working tree and the carried paths, together."""
MANIFEST = "MANIFEST.json"

_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>.+)\.whl$"
)


@dataclass(frozen=True)
class Wheel:
    """One wheel file, by its name's fields (PEP 427)."""

    filename: str
    name: str
    version: str
    python: str
    abi: str
    platform: str
    size: int

    def runs_on(self, python_tag: str) -> bool:
        """Whether CPython ``python_tag`` (``cp312``) can install it (any platform tag is taken to fit)."""
        wanted = _version_number(python_tag)
        for tag in self.python.split("."):
            if tag in ("py3", "py2.py3") or (tag.startswith("py3") and self.abi == "none"):
                return True
            if tag.startswith("cp"):
                if self.abi == "abi3" and _version_number(tag) <= wanted:
                    return True
                if tag == python_tag:
                    return True
        return False


def _version_number(tag: str) -> int:
    digits = tag[2:]
    return int(digits[0]) * 100 + int(digits[1:] or 0)


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(filename: str, size: int = 0) -> Wheel | None:
    """A wheel file name's fields, or None for a name that is not a wheel's."""
    match = _WHEEL.match(filename)
    if match is None:
        return None
    return Wheel(
        filename=filename,
        name=normalize(match["name"]),
        version=match["version"],
        python=match["python"],
        abi=match["abi"],
        platform=match["platform"],
        size=size,
    )


def read_wheels(directory: Path) -> list[Wheel]:
    """The wheels in ``directory``, with their sizes."""
    found = (parse_wheel(path.name, path.stat().st_size) for path in sorted(Path(directory).glob("*.whl")))
    return [wheel for wheel in found if wheel is not None]


def missing_for(wheels: list[Wheel], python_tag: str) -> list[str]:
    """The distributions of the wheelhouse that have no wheel CPython ``python_tag`` can install."""
    names = sorted({wheel.name for wheel in wheels})
    return [name for name in names if not any(w.runs_on(python_tag) for w in wheels if w.name == name)]


def python_tags(wheels: list[Wheel]) -> list[str]:
    """The CPython tags (``cp311``, ``cp312``) that every distribution of the wheelhouse can serve."""
    candidates = sorted(
        {tag for wheel in wheels for tag in wheel.python.split(".") if tag.startswith("cp")},
        key=_version_number,
    )
    return [tag for tag in candidates if not missing_for(wheels, tag)]


def tree_bytes(repo: Path, leave_out: tuple[Path, ...] = ()) -> int:
    """Bytes of what travels besides carried paths: git's tracked and unignored untracked files.

    Without git (or a checkout), every file under ``repo`` but ``.git`` and ``leave_out``.
    """
    repo = Path(repo)
    leave = tuple(path.resolve() for path in leave_out)
    try:
        listed = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        paths = [repo / os.fsdecode(name) for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [
            Path(root) / name
            for root, dirs, files in os.walk(repo)
            if ".git" not in Path(root).relative_to(repo).parts
            for name in files
        ]
    total = 0
    for path in paths:
        if any(path.resolve().is_relative_to(place) for place in leave):
            continue
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def report(directory: Path, other_bytes: int = 0, budget: int = BUDGET_BYTES) -> dict:
    """What the wheelhouse holds and whether it and ``other_bytes`` (the rest that travels) fit ``budget``."""
    wheels = read_wheels(directory)
    wheel_bytes = sum(wheel.size for wheel in wheels)
    total = wheel_bytes + other_bytes
    return {
        "directory": str(directory),
        "wheels": [{"file": w.filename, "bytes": w.size} for w in wheels],
        "distributions": sorted({w.name for w in wheels}),
        "python_tags": python_tags(wheels),
        "wheel_bytes": wheel_bytes,
        "other_bytes": other_bytes,
        "total_bytes": total,
        "budget_bytes": budget,
        "fits": bool(wheels) and total <= budget,
    }


def describe(summary: dict) -> str:
    """One line: the wheelhouse's size, the rest, the budget, the Pythons it serves."""
    return (
        f"wheelhouse {summary['wheel_bytes'] / MEBIBYTE:.1f} MiB in {len(summary['wheels'])} wheels "
        f"+ tree {summary['other_bytes'] / MEBIBYTE:.1f} MiB = {summary['total_bytes'] / MEBIBYTE:.1f} MiB "
        f"of {summary['budget_bytes'] / MEBIBYTE:.0f} MiB; "
        f"Pythons: {', '.join(summary['python_tags']) or 'none'}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheelhouse", type=Path)
    parser.add_argument("--repo", type=Path, help="count the working tree that travels with it")
    parser.add_argument("--write-manifest", action="store_true", help=f"write {MANIFEST} into the wheelhouse")
    arguments = parser.parse_args(argv)
    other = tree_bytes(arguments.repo, (arguments.wheelhouse,)) if arguments.repo else 0
    summary = report(arguments.wheelhouse, other)
    print(describe(summary))
    if arguments.write_manifest:
        (arguments.wheelhouse / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["fits"]:
        print("over the budget (or empty): see deploy/gpu/README.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
