"""The README's "Serving recommendations" snippets, run as written against a published run."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from mf_dist.stages.fold_in import fold_in
from mf_dist.stages.recommend import recommend_items
from mf_dist.storage.reader import read_embeddings, read_published
from tests.support.paths import REPO
from tests.support.recommend import publish_user_item_run


def readme_snippets(section: str) -> list[str]:
    """The ```python blocks of one ``## `` section of the README, in order."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_the_service_recipe_reads_recommendations_and_folds_in_a_user(client, tmp_path, monkeypatch):
    rng = np.random.default_rng(18)
    user_ids, item_ids = [40, 41, 42, 43], [3, 7, 11, 31, 40, 52, 60, 77, 81, 90, 95, 99]
    ratings = pd.DataFrame(
        [(user, int(item), 5.0) for user in range(4) for item in rng.choice(12, size=3, replace=False)],
        columns=["user", "item", "rating"],
    )
    publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "work",
        user_ids,
        item_ids,
        rng.normal(size=(4, 3)),
        rng.normal(size=(12, 3)),
        ratings,
        hyperparameters={"alpha": 10.0, "regularization": 0.1},
    )
    recommend_items(client, tmp_path / "out", 5, work_dir=tmp_path / "work")
    reading, folding = readme_snippets("Serving recommendations")
    monkeypatch.chdir(tmp_path)

    served: dict = {}
    exec(reading, served)  # the README's own code, as written

    table, _, _ = read_published(tmp_path / "out", "recommendations")
    expected = table.to_pandas().query("user_id == 42").sort_values("rank")
    assert [item for item, _ in served["top"]] == expected.item_id.tolist()
    np.testing.assert_allclose([score for _, score in served["top"]], expected.score, rtol=1e-6)
    assert len(served["top"]) == 5

    folded: dict = {}
    exec(folding, folded)

    items = read_embeddings(tmp_path / "out", "items")
    direct = fold_in(items, folded["ratings"])
    assert folded["user"].ids.tolist() == [10_001]
    np.testing.assert_array_equal(folded["user"].vectors, direct.vectors)
    scores = items.vectors @ direct.vectors[0]
    assert folded["best"].tolist() == [item_ids[i] for i in np.argsort(-scores)[:10]]
