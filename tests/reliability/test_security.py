"""Nothing read from disk is unpickled, no shell runs what a user typed, servers stay on loopback."""

from __future__ import annotations

import ast
import base64
import json
import os
import pickle
from pathlib import Path

import psutil
import pytest
from prefect._internal.result_records import ResultRecord

import mf_dist.runtime.cluster
from mf_dist.flows.stage_cache import STAGES_DIR
from mf_dist.runtime.cluster import open_client
from mf_dist.runtime.cluster_settings import SlurmSettings
from tests.support.paths import REPO
from tests.support.runs import cli, run_flags

SOURCES = sorted([*(REPO / "mf_dist").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
SHELL_CALLS = {
    "os.system",
    "os.popen",
    "os.execl",
    "os.execlp",
    "os.spawnl",
    "asyncio.create_subprocess_shell",
}


def dotted(node: ast.expr) -> str:
    """``a.b.c`` for an attribute chain or name, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_reads(source: str, name: str = "<snippet>") -> list[str]:
    """Places in ``source`` that could unpickle what they read.

    pickle-family modules imported at all; ``torch.load`` without
    ``weights_only=True``; ``np.load`` with ``allow_pickle`` other than
    False; ``pandas.read_pickle``; ``yaml.load`` without a safe loader;
    Prefect results persisted without the JSON serializer (in a call or in a
    dict of task options), and Prefect tasks and flows without it: Prefect
    writes every failure's exception to its result storage and reads it back
    when a run's result is asked for.
    """
    findings = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            )
            findings += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.Call):
            function = dotted(node.func)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            if function.endswith("torch.load") and not is_constant(keywords.get("weights_only"), True):
                findings.append(f"{where}: {function} without weights_only=True")
            allow_pickle = keywords.get("allow_pickle", ast.Constant(False))
            if function in {"np.load", "numpy.load"} and not is_constant(allow_pickle, False):
                findings.append(f"{where}: {function} with allow_pickle")
            if function.endswith("read_pickle"):
                findings.append(f"{where}: {function}")
            if function in {"yaml.load", "yaml.unsafe_load", "yaml.full_load"}:
                loader = dotted(keywords.get("Loader", ast.Constant(None)))
                if not loader.endswith(("SafeLoader", "CSafeLoader")):
                    findings.append(f"{where}: {function} without a safe loader")
            if is_constant(keywords.get("persist_result"), True) and not (
                isinstance(keywords.get("result_serializer"), ast.Constant)
                and keywords["result_serializer"].value == "json"
            ):
                findings.append(f"{where}: results persisted without result_serializer='json'")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                call = decorator if isinstance(decorator, ast.Call) else None
                if dotted(call.func if call else decorator).split(".")[-1] not in {"task", "flow"}:
                    continue
                serializer = (
                    {k.arg: k.value for k in call.keywords}.get("result_serializer") if call else None
                )
                if not (isinstance(serializer, ast.Constant) and serializer.value == "json"):
                    findings.append(f"{where}: a Prefect task or flow without result_serializer='json'")
        elif isinstance(node, ast.Dict):
            options = {
                key.value: value
                for key, value in zip(node.keys, node.values, strict=True)
                if isinstance(key, ast.Constant)
            }
            if is_constant(options.get("persist_result"), True):
                serializer = options.get("result_serializer")
                if not (isinstance(serializer, ast.Constant) and serializer.value == "json"):
                    findings.append(f"{where}: results persisted without 'result_serializer': 'json'")
    return findings


def shell_uses(source: str, name: str = "<snippet>") -> list[str]:
    """Calls that hand a string to a shell or to the interpreter."""
    findings = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Call):
            continue
        function = dotted(node.func)
        shell = any(k.arg == "shell" and not is_constant(k.value, False) for k in node.keywords)
        if function in SHELL_CALLS or function in {"eval", "exec"} or shell:
            findings.append(
                f"{name}:{node.lineno}: {function or 'call'}{' with shell=True' if shell else ''}"
            )
    return findings


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from cloudpickle import loads",
        "import torch\ntorch.load(path)",
        "torch.load(path, weights_only=False)",
        "np.load(path, allow_pickle=True)",
        "pd.read_pickle(path)",
        "yaml.load(text)",
        "task.with_options(persist_result=True)",
        "options = {'persist_result': True, 'result_storage': path}",
        "@task(name='stage')\ndef stage(): pass",
        "@prefect.flow\ndef pipeline(): pass",
    ],
)
def test_the_scan_finds_unpickling(snippet):
    assert unsafe_reads(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "np.load(path, allow_pickle=False)",
        "np.load(path)",
        "torch.load(path, weights_only=True)",
        "yaml.safe_load(text)",
        "options = {'persist_result': True, 'result_serializer': 'json'}",
        "@task(name='stage', result_serializer='json')\ndef stage(): pass",
        "@functools.cache\ndef cached(): pass",
    ],
)
def test_the_scan_lets_safe_reads_pass(snippet):
    assert not unsafe_reads(snippet)


@pytest.mark.parametrize(
    "snippet", ["os.system(command)", "subprocess.run(command, shell=True)", "eval(text)"]
)
def test_the_scan_finds_shells(snippet):
    assert shell_uses(snippet)


def test_nothing_read_from_disk_is_unpickled():
    assert len(SOURCES) > 30
    findings = [f for path in SOURCES for f in unsafe_reads(path.read_text(), str(path.relative_to(REPO)))]
    assert not findings, "\n".join(findings)


def test_no_shell_runs_anything():
    """No string reaches a shell or eval: subprocesses (dask-jobqueue's sbatch) get argument lists."""
    findings = [f for path in SOURCES for f in shell_uses(path.read_text(), str(path.relative_to(REPO)))]
    assert not findings, "\n".join(findings)


@pytest.mark.parametrize("field", ["queue", "account", "walltime", "memory", "interface", "python"])
def test_slurm_settings_cannot_smuggle_a_shell_line_into_the_job_script(field):
    """The job script holds these in #SBATCH lines or commands: a newline would start a new command."""
    with pytest.raises(ValueError, match="control characters"):
        SlurmSettings(**{field: "x\nrm -rf ~"})


class Touch:
    """Unpickling this creates ``path``: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def planted_record(storage_key: str, marker: Path) -> bytes:
    """A Prefect result record that names the pickle serializer, as an attacker would write it."""
    payload = base64.encodebytes(pickle.dumps(Touch(marker))).decode()
    serializer = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
    metadata = {"storage_key": storage_key, "expiration": None, "serializer": serializer}
    return json.dumps({"metadata": {**metadata, "storage_block_id": None}, "result": payload}).encode()


@pytest.mark.slow
def test_stage_results_are_json_and_a_planted_pickle_is_never_loaded(
    client, prefect_api, published_source, tmp_path
):
    output = tmp_path / "out"
    flags = run_flags(published_source, output, client.scheduler.address)
    assert cli(*flags) is None
    results = sorted((output / "_work" / STAGES_DIR / "results").iterdir())
    assert {path.name.split("-")[2] for path in results} == {"ingest", "cooccurrence", "train"}
    for path in results:
        assert json.loads(path.read_bytes())["metadata"]["serializer"]["type"] == "json", path

    marker = tmp_path / "unpickled"
    for path in results:
        path.write_bytes(planted_record(str(path), marker))
    # The planted record is live: Prefect's own reader unpickles it.
    ResultRecord.deserialize(results[0].read_bytes())
    assert marker.exists()
    marker.unlink()

    assert cli(*flags) is None
    assert not marker.exists(), "a cached stage result was unpickled"
    for path in results:
        assert json.loads(path.read_bytes())["metadata"]["serializer"]["type"] == "json", path


def listening_sockets() -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of this process and its descendants."""
    me = psutil.Process()
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    return [
        (connection.laddr.ip, connection.laddr.port, connection.pid)
        for connection in psutil.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN and connection.pid in pids
    ]


@pytest.mark.parametrize("kind", ["cpu workers", "one worker per GPU"])
def test_servers_listen_on_loopback_only(prefect_api, monkeypatch, kind):
    """The cluster ``mf-dist run`` starts, and the temporary Prefect server, listen on 127.0.0.1 only.

    That includes the HTTP server every Dask scheduler opens (health and
    metrics routes) even without a dashboard. The GPU variant runs its real
    worker specs with a stand-in device id.
    """
    if kind == "one worker per GPU":
        monkeypatch.setattr(mf_dist.runtime.cluster, "visible_gpu_ids", lambda: ["0"])
    with open_client(workers=2) as client:
        sockets = listening_sockets()
        scheduler_http = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.http_server.port)
        worker_http = client.run(lambda dask_worker: dask_worker.http_server.port)
        ports = {port for _, port, _ in sockets}
        expected = {int(client.scheduler.address.rsplit(":", 1)[1]), scheduler_http, *worker_http.values()}
        expected |= {int(address.rsplit(":", 1)[1]) for address in worker_http}
        expected.add(int(prefect_api.rsplit(":", 1)[1].split("/")[0]))
    assert expected <= ports, f"{expected - ports} not found among {sockets}"
    assert scheduler_http != 8787
    exposed = [entry for entry in sockets if entry[0] not in ("127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed} (pid {os.getpid()} and its children)"
