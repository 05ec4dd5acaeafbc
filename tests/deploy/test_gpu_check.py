"""deploy/gpu/check.sh's quick pieces: the clock and the skip rules, a step stopped at the budget,
the wheelhouse's size check on a fake wheelhouse, the result writer, the plan's steps. The whole
check (install included) is its dry run: ``deploy/gpu/check.sh --dry-run``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mf_dist.bench.gpu_check import install, report, wheelhouse
from mf_dist.bench.gpu_check.__main__ import ESTIMATES, SCALES, build_steps, scale_chooser
from mf_dist.bench.gpu_check.plan import Clock, Outcome, Runner, Step, choose_scale, over_budget, unmet_need
from tests.support.paths import REPO


class FakeTime:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def quiet_runner(clock: Clock) -> tuple[Runner, list[str]]:
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.extend(line for line in text.splitlines() if line)

        def flush(self) -> None:
            pass

    return Runner(clock, Sink()), lines


# --- clock, skip rules --------------------------------------------------------------------------


def test_clock_counts_from_the_shells_start_and_prints_minutes():
    time = FakeTime(1000.0)
    clock = Clock(480, started=990.0, now=time)
    assert clock.elapsed == 10 and clock.remaining == 470
    time.now = 1000.0 + 125
    assert clock.stamp() == "[2:15]"


def test_a_step_is_skipped_when_its_estimate_does_not_fit_or_a_need_failed():
    time = FakeTime()
    clock = Clock(100, now=time)
    big = Step("big", 95.0, run=lambda context: (True, "", {}))
    assert over_budget(big, clock, {}) is not None  # 95 > 100 - the 10 s reserve
    assert over_budget(Step("small", 50.0), clock, {}) is None
    scaled = Step("scaled", lambda context: {"tiny": 5, "ml20m": 500}[context["scale"]])
    assert over_budget(scaled, clock, {"scale": "tiny"}) is None
    assert over_budget(scaled, clock, {"scale": "ml20m"}) is not None
    needy = Step("needy", 1.0, needs=("install",))
    assert unmet_need(needy, {}) == "needs install (not run)"
    assert unmet_need(needy, {"install": Outcome("install", "failed")}) == "needs install (failed)"
    assert unmet_need(needy, {"install": Outcome("install", "passed")}) is None


def test_runner_runs_skips_and_reports_in_order():
    time = FakeTime()
    clock = Clock(100, now=time)
    runner, lines = quiet_runner(clock)

    def work(context: dict) -> tuple[bool, str, dict]:
        time.now += 30
        return True, "did it", {"value": 1}

    def broken(context: dict) -> tuple[bool, str, dict]:
        raise RuntimeError("boom")

    outcomes = runner.run_all(
        [
            Step("first", 20.0, run=work),
            Step("broken", 1.0, run=broken),
            Step("after-broken", 1.0, run=work, needs=("broken",)),
            Step("too-long", 80.0, run=work),
            Step("second", 20.0, run=work),
        ]
    )
    assert [(o.name, o.status) for o in outcomes] == [
        ("first", "passed"),
        ("broken", "failed"),
        ("after-broken", "skipped"),
        ("too-long", "skipped"),
        ("second", "passed"),
    ]
    assert outcomes[0].seconds == pytest.approx(30) and outcomes[0].result == {"value": 1}
    assert "RuntimeError: boom" in outcomes[1].note
    assert "needs broken" in outcomes[2].note
    assert "estimated 80 s" in outcomes[3].note
    assert all(line.startswith("[") for line in lines)


def test_scale_is_the_largest_that_fits():
    estimates = {"tiny": 10, "small": 50, "ml20m": 200}
    assert choose_scale(estimates, 300) == "ml20m"
    assert choose_scale(estimates, 100) == "small"
    assert choose_scale(estimates, 5) is None
    context: dict = {}
    gpu = ESTIMATES["gpu"]
    # The last scaled step takes the largest scale that fits.
    last = scale_chooser("gpu", "cooccurrence", "scale")
    assert last(context, 1e6) is None and context["scale"] == "ml20m"
    assert last(context, gpu["cooccurrence"]["small"] + 1) is None and context["scale"] == "small"
    assert "no scale fits" in last(context, 1.0)
    # An earlier one leaves the later ones their smallest run.
    first = scale_chooser("gpu", "implicit-als", "scale")
    rest = gpu["gradient"]["tiny"] + gpu["cooccurrence"]["tiny"]
    assert first(context, gpu["implicit-als"]["ml20m"] + rest) is None and context["scale"] == "ml20m"
    assert first(context, gpu["implicit-als"]["ml20m"] + rest - 1) is None and context["scale"] == "small"
    # Alone, the smallest still runs when the others could not all fit beside it.
    assert first(context, gpu["implicit-als"]["tiny"] + 1) is None and context["scale"] == "tiny"


def test_a_child_step_is_stopped_at_the_budget_with_its_process_group(tmp_path):
    """A step that outruns the budget is stopped (its children too), and the next step still runs."""
    marker = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(marker)!r}, 'w').write(str(child.pid)); "
        "print('started', flush=True); time.sleep(60)"
    )
    clock = Clock(13.0)  # 3 s after the 10 s reserve
    runner, lines = quiet_runner(clock)
    outcomes = runner.run_all(
        [
            Step("sleeper", 1.0, command=lambda context: [sys.executable, "-c", script]),
            Step("next", 0.0, run=lambda context: (True, "", {})),
        ]
    )
    assert outcomes[0].status == "timed out"
    assert outcomes[0].seconds < 12
    assert any("started" in line for line in lines)
    grandchild = int(marker.read_text())
    assert (
        not Path(f"/proc/{grandchild}").exists()
        or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    )
    assert outcomes[1].status in ("passed", "skipped")


def test_a_failing_child_step_and_its_result_file(tmp_path):
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"passed": False, "note": "out of tolerance"}))
    clock = Clock(100.0)
    runner, _ = quiet_runner(clock)
    outcomes = runner.run_all(
        [
            Step("exits-1", 1.0, command=lambda context: [sys.executable, "-c", "raise SystemExit(1)"]),
            Step(
                "says-failed",
                1.0,
                command=lambda context: [sys.executable, "-c", "pass"],
                read_result=lambda context: json.loads(result.read_text()),
            ),
        ]
    )
    assert outcomes[0].status == "failed" and "exit status 1" in outcomes[0].note
    assert outcomes[1].status == "failed" and outcomes[1].note == "out of tolerance"


# --- wheelhouse ---------------------------------------------------------------------------------


def fake_wheelhouse(directory: Path, sizes: dict[str, int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (directory / name).write_bytes(b"\0" * size)
    return directory


def test_wheelhouse_size_check_on_a_fake_wheelhouse(tmp_path):
    house = fake_wheelhouse(
        tmp_path / "wheels",
        {
            "dask-2026.8.0-py3-none-any.whl": 1000,
            "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl": 2000,
            "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl": 2000,
            "tornado-6.6.1-cp311-abi3-manylinux_2_28_x86_64.whl": 500,
            "README.txt": 10_000,  # not a wheel: not counted
        },
    )
    summary = wheelhouse.report(house, other_bytes=1500, budget=8000)
    assert summary["wheel_bytes"] == 5500 and summary["total_bytes"] == 7000 and summary["fits"]
    assert summary["python_tags"] == ["cp311", "cp312"]
    assert summary["distributions"] == ["dask", "pydantic-core", "tornado"]
    assert not wheelhouse.report(house, other_bytes=3000, budget=8000)["fits"]
    assert not wheelhouse.report(tmp_path / "empty", budget=8000)["fits"]
    assert "5.4 KiB" not in wheelhouse.describe(summary)  # MiB, with the Pythons it serves
    assert "Pythons: cp311, cp312" in wheelhouse.describe(summary)


def test_wheelhouse_knows_which_pythons_it_serves():
    def wheel(filename: str) -> wheelhouse.Wheel:
        return wheelhouse.parse_wheel(filename)

    assert wheel("tornado-6.6.1-cp311-abi3-manylinux1_x86_64.whl").runs_on("cp313")
    assert not wheel("tornado-6.6.1-cp311-abi3-manylinux1_x86_64.whl").runs_on("cp310")
    assert wheel("zict-3.0.0-py2.py3-none-any.whl").runs_on("cp312")
    assert not wheel("implicit-0.7.3-cp311-cp311-manylinux2014_x86_64.whl").runs_on("cp312")
    wheels = [
        wheel("implicit-0.7.3-cp311-cp311-manylinux2014_x86_64.whl"),
        wheel("dask-2026.8.0-py3-none-any.whl"),
    ]
    assert wheelhouse.missing_for(wheels, "cp312") == ["implicit"]
    assert wheelhouse.python_tags(wheels) == ["cp311"]


def test_wheelhouse_script_writes_its_manifest_and_fails_over_budget(tmp_path):
    house = fake_wheelhouse(tmp_path / "wheels", {"dask-2026.8.0-py3-none-any.whl": 1000})
    script = REPO / "mf_dist" / "bench" / "gpu_check" / "wheelhouse.py"
    # Run by a bare interpreter's path, as build-wheelhouse.sh does: standard library only.
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(house), "--write-manifest"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((house / wheelhouse.MANIFEST).read_text())["wheel_bytes"] == 1000


def test_image_provided_list_is_the_installers():
    listed = [
        line.strip()
        for line in (REPO / "deploy" / "gpu" / "image-provided.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert tuple(listed) == install.IMAGE_PROVIDED


def test_tree_bytes_counts_what_travels(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 100)
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "b.bin").write_bytes(b"x" * 1000)
    assert wheelhouse.tree_bytes(tmp_path, (tmp_path / "skip",)) == 100
    assert wheelhouse.tree_bytes(tmp_path) == 1100


# --- results ------------------------------------------------------------------------------------


def test_results_are_written_as_json_and_markdown(tmp_path):
    outcomes = [
        Outcome("wheelhouse", "passed", 0.1, 0.0, "28 MiB"),
        Outcome(
            "install",
            "passed",
            20.0,
            0.1,
            "ok",
            {
                "python": "3.12.3",
                "imports": {"torch": {"version": "2.11.0", "from": "/x"}},
                "device": {"name": "H100"},
            },
        ),
        Outcome(
            "parity",
            "failed",
            50.0,
            20.0,
            "1 of 2",
            {
                "tolerance": {"loss_rtol": 1e-3, "table_rtol": 1e-2},
                "rows": [
                    {
                        "case": "implicit/als/cg",
                        "candidate_device": "cuda",
                        "reference_loss": 1.0,
                        "candidate_loss": 1.0001,
                        "loss_rel_diff": 1e-4,
                        "history_max_rel_diff": 2e-4,
                        "table_rel_diffs": {"users": 1e-5, "items": 3e-3},
                        "passed": True,
                    }
                ],
            },
        ),
        Outcome("gradient", "skipped", 0.0, 70.0, "estimated 150 s, 20 s left in the budget"),
    ]
    doc = report.document(outcomes, mode="gpu", budget=480, elapsed=71.0)
    assert not doc["passed"]  # parity failed
    assert doc["python"] == "3.12.3" and doc["versions"] == {"torch": "2.11.0"}
    json_path, markdown_path = report.write(tmp_path / "out", doc)
    assert json.loads(json_path.read_text())["steps"][2]["result"]["rows"][0]["case"] == "implicit/als/cg"
    page = markdown_path.read_text()
    assert "| parity | failed | 50 | 1 of 2 |" in page
    assert "items 3.0e-03" in page
    assert "H100" in page
    skipped_only = report.document([outcomes[0], outcomes[3]], mode="dry", budget=10, elapsed=1)
    assert skipped_only["passed"]


def test_the_plan_has_every_step_with_an_estimate_per_mode(tmp_path):
    arguments = argparse.Namespace(
        scratch=tmp_path, out=tmp_path / "out", wheelhouse=tmp_path / "w", requirements=tmp_path / "r.txt"
    )
    for mode, device in (("gpu", "cuda"), ("dry", "cpu")):
        steps = build_steps(arguments, mode, device)
        names = [step.name for step in steps]
        assert names[:3] == ["wheelhouse", "install", "cuda-tests"]
        assert {"parity", "memory-bound", "data", "implicit-als", "cooccurrence", "gradient"} <= set(names)
        assert names[-1] == "recommend"
        context = {f"scale:{name}": "tiny" for name in names}
        for step in steps:
            assert step.expected(context) > 0
            if step.command is not None:
                argv = step.command(context)
                assert argv[argv.index("--device") + 1] == ("cpu" if step.name == "cooccurrence" else device)
    assert set(ESTIMATES["gpu"]["implicit-als"]) == set(SCALES)
    assert set(ESTIMATES["dry"]["implicit-als"]) == {"tiny"}


def test_the_gpu_plan_fits_eight_minutes_when_steps_take_their_estimates(tmp_path):
    """Every step runs, the largest scales go first, and the whole stays within the budget."""
    arguments = argparse.Namespace(
        scratch=tmp_path, out=tmp_path / "out", wheelhouse=tmp_path / "w", requirements=tmp_path / "r.txt"
    )
    time = FakeTime()
    clock = Clock(480, now=time)
    runner, _ = quiet_runner(clock)

    def taking(step: Step) -> Step:
        def run(context: dict) -> tuple[bool, str, dict]:
            time.now += step.expected(context)
            return True, "", {}

        return replace(step, run=run, command=None, read_result=None)

    outcomes = runner.run_all([taking(step) for step in build_steps(arguments, "gpu", "cuda")])
    # recommend, last, runs on what the others leave: here nothing.
    assert [o.status for o in outcomes[:-1]] == ["passed"] * (len(outcomes) - 1)
    assert outcomes[-1].name == "recommend" and outcomes[-1].status == "skipped"
    assert "no scale fits" in outcomes[-1].note
    assert clock.elapsed <= 480
    assert runner.context["scale:implicit-als"] == "ml20m"


@pytest.mark.parametrize("script", ["check.sh", "build-wheelhouse.sh", "standin-image.sh"])
def test_the_scripts_parse_and_the_wheelhouse_stays_out_of_git(script):
    path = REPO / "deploy" / "gpu" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", "deploy/gpu/wheelhouse/x-1-py3-none-any.whl"],
        capture_output=True,
    )
    assert ignored.returncode in (0, 128)  # 128: not a git checkout (a copied tree)


def test_check_sh_says_how_to_use_it():
    done = subprocess.run(
        ["bash", str(REPO / "deploy" / "gpu" / "check.sh"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--dry-run" in done.stdout and "$OUT" in done.stdout
    wrong = subprocess.run(
        ["bash", str(REPO / "deploy" / "gpu" / "check.sh"), "--no-such-flag"], capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr
