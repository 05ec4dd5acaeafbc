"""The check's environment: a fresh venv over the image's packages, filled from the wheelhouse alone.

The machine's Python (the one running the driver) keeps its packages: torch with CUDA, numpy,
pandas, pyarrow, and what the check takes from it rather than carry (:data:`IMAGE_PROVIDED`).
On the GPU machines that Python is itself a venv (``/opt/torch/.venv``), so ``python -m venv
--system-site-packages`` would see the base interpreter's packages and not torch; instead the new
venv gets a ``.pth`` file that adds the image's site directories after its own, which is what
``--system-site-packages`` does for a plain interpreter. pip then installs from the wheelhouse
(``--no-index --find-links``, ``--isolated`` from any pip configuration) only what the image
lacks or has too old, into the new venv, which comes first on ``sys.path``.

Standard library only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

IMAGE_PROVIDED = ("torch", "numpy", "pandas", "pyarrow", "scipy", "numba", "llvmlite")
"""Taken from the machine's Python, never carried: torch is the image's CUDA build, and
llvmlite's wheel alone (60 MB) or scipy's (35 MB) would not fit the 64 MiB sent with the tree."""

CHECK_IMPORTS = (
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "numba",
    "dask",
    "distributed",
    "pydantic",
    "typer",
    "rich",
    "psutil",
    "implicit",
    "threadpoolctl",
    "pytest",
)
PTH_NAME = "_mf_dist_image_site.pth"


def image_site_dirs() -> list[str]:
    """The site directories of this (the machine's) Python, in its order."""
    return [
        entry
        for entry in sys.path
        if entry.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(entry).is_dir()
    ]


def missing_image_packages(names: tuple[str, ...] = IMAGE_PROVIDED) -> dict[str, str | None]:
    """Each image-provided distribution's version in this Python, None where it is absent."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_site(venv: Path) -> Path:
    """The new venv's site-packages, asked of its own Python."""
    out = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def create_venv(venv: Path, site_dirs: list[str], log: callable = print) -> None:
    """A fresh venv at ``venv`` that sees ``site_dirs`` after its own site-packages.

    Without pip of its own where this Python has ``pip``: that one serves through the
    ``.pth`` file (and the image may have no ``ensurepip``); else with ``ensurepip``'s.
    """
    shutil.rmtree(venv, ignore_errors=True)
    has_pip = any((Path(place) / "pip").is_dir() for place in site_dirs)
    command = [sys.executable, "-m", "venv", *(["--without-pip"] if has_pip else []), str(venv)]
    created = subprocess.run(command, capture_output=True, text=True, check=False)
    if created.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {created.stderr.strip()[-800:]}")
    lines = [f"import site; site.addsitedir({place!r})" for place in site_dirs]
    (venv_site(venv) / PTH_NAME).write_text("\n".join(lines) + "\n")
    log(f"venv {venv} over {', '.join(site_dirs) or 'no site directory'}")


def pip_install(venv: Path, wheelhouse: Path, requirements: Path) -> subprocess.CompletedProcess:
    """``pip install`` from the wheelhouse alone: no index, no pip configuration, wheels only."""
    command = [
        str(venv_python(venv)),
        "-m",
        "pip",
        "--isolated",
        "--disable-pip-version-check",
        "install",
        "--no-index",
        "--find-links",
        str(wheelhouse),
        "--only-binary=:all:",
        "--no-warn-script-location",
        "--progress-bar",
        "off",
        "-r",
        str(requirements),
    ]
    return subprocess.run(command, capture_output=True, text=True, check=False)


PROBE = """
import importlib, json, sys
from importlib.metadata import PackageNotFoundError, distribution
found = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        found[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    try:
        dist = distribution({"pytest": "pytest"}.get(name, name))
        version = dist.version
    except PackageNotFoundError:
        version = getattr(module, "__version__", "?")
    found[name] = {"version": version, "from": str(getattr(module, "__file__", "") or "")}
print(json.dumps(found))
"""


def probe_imports(venv: Path, names: tuple[str, ...] = CHECK_IMPORTS) -> dict[str, dict]:
    """Import each module in the new venv: its version and file, or the error."""
    out = subprocess.run(
        [str(venv_python(venv)), "-c", PROBE, *names], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"import probe failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


DEVICE_PROBE = """
import json, subprocess, torch
found = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if found["available"]:
    properties = torch.cuda.get_device_properties(0)
    found.update(
        name=properties.name,
        count=torch.cuda.device_count(),
        total_memory_bytes=properties.total_memory,
        capability=f"{properties.major}.{properties.minor}",
        multiprocessors=properties.multi_processor_count,
    )
    try:
        found["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except Exception:
        pass
print(json.dumps(found))
"""


def probe_device(venv: Path) -> dict:
    """torch's view of the GPU from the new venv (name, memory, capability, driver), or its error."""
    out = subprocess.run(
        [str(venv_python(venv)), "-c", DEVICE_PROBE], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def install(
    venv: Path, wheelhouse: Path, requirements: Path, served_tags: list[str], log: callable = print
) -> tuple[bool, str, dict]:
    """Create the venv and install; returns (passed, note, result) for the check's install step."""
    image = missing_image_packages()
    result: dict = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": sysconfig.get_platform(),
        "image_packages": image,
    }
    absent = [name for name, version in image.items() if version is None]
    if absent:
        note = (
            f"the machine's Python ({sys.executable}) lacks {', '.join(absent)}, which the wheelhouse "
            "does not carry (deploy/gpu/README.md: what is left out)"
        )
        return False, note, result
    tag = python_tag()
    if tag not in served_tags:
        log(
            f"warning: the wheelhouse serves {', '.join(served_tags) or 'no Python'}, not {tag}: "
            f"compiled wheels may be missing (rebuild with PYTHON_VERSIONS='{sys.version_info.major}."
            f"{sys.version_info.minor}' deploy/gpu/build-wheelhouse.sh)"
        )
    sites = image_site_dirs()
    create_venv(venv, sites, log)
    installed = pip_install(venv, wheelhouse, requirements)
    result["pip_output"] = installed.stdout.strip().splitlines()[-3:]
    if installed.returncode != 0:
        hint = "" if tag in served_tags else f" (the wheelhouse has no wheels for {tag})"
        return False, f"pip install failed{hint}: {installed.stderr.strip()[-600:]}", result
    for line in installed.stdout.splitlines():
        if line.startswith("Successfully installed"):
            log(line)
    result["imports"] = probe_imports(venv)
    broken = {name: info["error"] for name, info in result["imports"].items() if "error" in info}
    if broken:
        return False, f"imports failed in the new venv: {broken}", result
    root = str(venv.resolve())
    from_wheelhouse = sorted(
        name
        for name, info in result["imports"].items()
        if info["from"] and str(Path(info["from"]).resolve()).startswith(root)
    )
    result["from_wheelhouse"] = from_wheelhouse
    result["device"] = probe_device(venv)
    device = result["device"]
    where = device.get("name") or device.get("error", "no CUDA device")
    return True, f"from the wheelhouse: {', '.join(from_wheelhouse) or 'nothing'}; device: {where}", result
