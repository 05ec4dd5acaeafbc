"""The check's results: one JSON document and one Markdown page, written to the output folder.

Standard library only. Both are written at the end of the check and again after every step, so a
check stopped from outside still leaves what it had measured.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from pathlib import Path

from mf_dist.bench.gpu_check.plan import Outcome

JSON_NAME = "gpu-check.json"
MARKDOWN_NAME = "gpu-check.md"
LOG_NAME = "gpu-check.log"
MEBIBYTE = 1024 * 1024


def document(outcomes: list[Outcome], *, mode: str, budget: float, elapsed: float) -> dict:
    """The JSON document: where and how the check ran, and every step's outcome and figures.

    It passed when no step failed or ran out of time and at least one passed; skipped steps
    (no time left for them) are listed as such.
    """
    install = next((outcome.result for outcome in outcomes if outcome.name == "install"), {})
    imports = install.get("imports", {})
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "machine": f"{platform.node()} {platform.machine()}",
        "python": install.get("python", platform.python_version()),
        "versions": {name: info["version"] for name, info in imports.items() if "version" in info},
        "device": install.get("device", {}),
        "budget_seconds": budget,
        "elapsed_seconds": round(elapsed, 1),
        "passed": all(outcome.status in ("passed", "skipped") for outcome in outcomes)
        and any(outcome.status == "passed" for outcome in outcomes),
        "steps": [outcome.as_dict() for outcome in outcomes],
    }


def write(directory: Path, doc: dict) -> tuple[Path, Path]:
    """Write the JSON and Markdown forms of ``doc`` into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / JSON_NAME, directory / MARKDOWN_NAME
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    markdown_path.write_text(markdown(doc))
    return json_path, markdown_path


def _number(value: object, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _mib(value: object) -> str:
    return f"{value / MEBIBYTE:,.0f}" if isinstance(value, int | float) and value else ""


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = [_number(cell).replace("|", "\\|").replace("\n", " ") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _step(doc: dict, name: str) -> dict:
    return next((step for step in doc["steps"] if step["name"] == name), {})


def markdown(doc: dict) -> str:
    """The Markdown page: the steps, then a table per kind of figure that was measured."""
    device = doc.get("device", {})
    lines = [
        f"# mf-dist GPU check ({doc['mode']}, {doc['created']})",
        "",
        f"{device.get('name', 'no GPU')}; {doc['machine']}; Python {doc.get('python', '?')}, "
        f"torch {doc.get('versions', {}).get('torch', '?')}. "
        f"{doc['elapsed_seconds']:.0f} s of a {doc['budget_seconds']:.0f} s budget; "
        f"{'passed' if doc['passed'] else 'NOT passed'}.",
        "",
    ]
    lines += _table(
        ["step", "status", "seconds", "note"],
        [[s["name"], s["status"], round(s["seconds"], 1), s["note"]] for s in doc["steps"]],
    )

    parity = _step(doc, "parity").get("result", {}).get("rows", [])
    if parity:
        tolerance = _step(doc, "parity")["result"].get("tolerance", {})
        lines += [
            "",
            f"## Parity: each model × solver on {parity[0]['candidate_device']} against the CPU, same seed",
            "",
            f"Tolerance: final loss within {tolerance.get('loss_rtol', '?')} relative, every table within "
            f"{tolerance.get('table_rtol', '?')} relative Frobenius norm.",
            "",
        ]
        lines += _table(
            ["case", "loss cpu", "loss device", "loss rel diff", "history max rel diff", "worst table", "ok"],
            [
                [
                    row["case"],
                    row["reference_loss"],
                    row["candidate_loss"],
                    f"{row['loss_rel_diff']:.1e}",
                    f"{row['history_max_rel_diff']:.1e}",
                    _worst_table(row["table_rel_diffs"]),
                    row["passed"],
                ]
                for row in parity
            ],
        )

    suites = [row for name in ("implicit-als", "cooccurrence", "recommend") for row in _rows(doc, name)]
    if suites:
        lines += ["", "## Benchmark suites: ours against the CPU reference, in the same run", ""]
        lines += _table(
            [
                "suite",
                "scale",
                "ours on",
                "ours s/it",
                "ref s/it",
                "ours/ref",
                "ours peak GPU MiB",
                "ours peak MiB proc / tree",
                "quality",
                "ours",
                "ref",
                "ours, as run",
                "ref, as run",
            ],
            [_suite_row(row) for row in suites],
        )

    gradient = _rows(doc, "gradient")
    if gradient:
        lines += ["", "## Gradient updates: explicit/gradient (DSGD, Adagrad), ratings per second", ""]
        lines += _table(
            [
                "device",
                "workers",
                "batch",
                "ratings",
                "ratings/s",
                "steady epoch s",
                "× cpu",
                "peak GPU MiB",
                "loss",
            ],
            [
                [
                    row["device"],
                    row["workers"],
                    row["batch_size"],
                    row["ratings"],
                    round(row["ratings_per_second"]) if math.isfinite(row["ratings_per_second"]) else "nan",
                    row["steady_epoch_seconds"],
                    row.get("speedup_over_cpu"),
                    _mib(row.get("peak_gpu_bytes_max")),
                    row["final_loss"],
                ]
                for row in gradient
            ],
        )

    memory = _step(doc, "memory-bound")
    if memory.get("result"):
        result = memory["result"]
        lines += [
            "",
            "## GPU memory bounded by the block size",
            "",
            f"explicit/gradient, {result.get('users', 0):,} users × rank {result.get('rank')} "
            f"(users table {_mib(result.get('user_table_bytes'))} MiB, one block "
            f"{_mib(result.get('block_bytes'))} MiB), {_cap(result.get('cap_bytes'))}: {memory['status']}; "
            f"peak {_mib(result.get('peak_gpu_bytes_max')) or '–'} MiB, {_number(result.get('seconds'))} s.",
        ]

    data = _step(doc, "data").get("result", {})
    if data.get("ratings"):
        lines += [
            "",
            "## Generated data",
            "",
            f"`{data['scale']}`: {data['ratings']:,} ratings, {data['users']:,} users, "
            f"{data['items']:,} items, likes {data['likes_share']:.1%}; generated and written in "
            f"{data['generate_and_write_seconds']:.3g} s.",
        ]
    lines.append("")
    return "\n".join(lines)


def _cap(cap_bytes: object) -> str:
    if not cap_bytes:
        return "no cap (not on a GPU)"
    return f"worker capped at {_mib(cap_bytes)} MiB (`torch.cuda.set_per_process_memory_fraction`)"


def _rows(doc: dict, name: str) -> list[dict]:
    return _step(doc, name).get("result", {}).get("rows", [])


def _worst_table(diffs: dict[str, float]) -> str:
    if not diffs:
        return ""
    name = max(diffs, key=lambda key: diffs[key])
    return f"{name} {diffs[name]:.1e}"


def _suite_row(row: dict) -> list[object]:
    ours, reference = row.get("ours") or {}, row.get("reference") or {}

    def per_iteration(side: dict) -> float | None:
        return side["seconds"] / max(1, side.get("iterations", 1)) if side else None

    return [
        row["suite"],
        row["scale"],
        row["device"],
        per_iteration(ours),
        per_iteration(reference),
        row.get("ratio"),
        _mib(ours.get("details", {}).get("peak_gpu_bytes_max")),
        f"{_mib(ours.get('peak_process_bytes'))} / {_mib(ours.get('peak_total_bytes'))}" if ours else "",
        ours.get("quality_name", ""),
        ours.get("quality"),
        reference.get("quality"),
        ours.get("implementation", row.get("failed") or ""),
        reference.get("implementation", row.get("unavailable") or ""),
    ]
