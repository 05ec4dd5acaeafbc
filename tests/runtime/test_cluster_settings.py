"""The ``[cluster]`` table and the run's retry and cache settings, as a user writes them."""

from __future__ import annotations

import pytest

from mf_dist.config import load_config
from mf_dist.errors import ConfigError

SLURM_FILE = """
input = "in"
output = "out"
workers = 4

[cluster]
kind = "local"

[cluster.slurm]
queue = "gpu"
account = "recsys"
cores = 8
memory = "64GB"
gpus_per_worker = 1
"""


def test_cluster_defaults_to_local_workers():
    settings = load_config(None, input="in", output="out")
    assert settings.cluster.kind == "local"
    assert (settings.retries, settings.cache) == (1, True)


def test_cluster_flag_picks_the_kind_and_keeps_the_file_settings(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(SLURM_FILE)
    settings = load_config(config, cluster="slurm")
    assert settings.cluster.kind == "slurm"
    assert (settings.cluster.slurm.queue, settings.cluster.slurm.cores) == ("gpu", 8)
    assert settings.cluster.slurm.gpus_per_worker == 1
    assert settings.workers == 4


def test_cluster_flag_without_a_file_uses_the_kind_defaults():
    settings = load_config(None, input="in", output="out", cluster="kubernetes")
    assert settings.cluster.kind == "kubernetes"
    assert settings.cluster.kubernetes.namespace == "default"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[cluster]\nkind = "pbs"\n', r"cluster.kind: .*'pbs'"),
        ('[cluster.slurm]\nqueu = "gpu"\n', r"unknown key 'cluster.slurm.queu'"),
        (
            "[cluster.slurm]\ngpus_per_worker = 2\n",
            r"cluster.slurm.gpus_per_worker: .*less than or equal to 1",
        ),
        ('[cluster.slurm]\ngpu_directive = "--gres=gpu:2"\n', r"must contain \{gpus\}"),
        ('[cluster.kubernetes]\nname = "MF_dist"\n', r"cluster.kubernetes.name: .*lowercase"),
        ("retries = -1\n", r"retries: .*greater than or equal to 0"),
    ],
)
def test_bad_cluster_settings_name_the_key(tmp_path, table, message):
    config = tmp_path / "run.toml"
    config.write_text('input = "in"\noutput = "out"\n' + table)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_a_scheduler_address_and_a_batch_cluster_exclude_each_other():
    with pytest.raises(ConfigError, match="both say where workers are"):
        load_config(None, input="in", output="out", scheduler="tcp://127.0.0.1:8786", cluster="slurm")
