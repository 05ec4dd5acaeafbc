"""The ratings of ``mf-dist bench quality``: where MovieLens 100K is, reading a ratings file, k folds.

MovieLens 100K is looked for at ``../shared/data/ml-100k.tsv`` beside the
repository (:data:`MOVIELENS_100K`, the one place that path is written; the
tests' ``movielens_100k`` fixture reads it too). Any other ratings file is a
Parquet file or a tab-separated text file whose first three columns are
user, item and rating.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mf_dist.errors import InputError

MOVIELENS_100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k.tsv"
"""MovieLens 100K (GroupLens; 943 users, 1,682 movies, 100,000 ratings 1–5) in the shared data folder."""

LIKE_THRESHOLD = 4.0
"""A rating ≥ this is a like: the relevant items of the ranking metrics and the training data of the
implicit-feedback sides."""

COLUMNS = ("user_id", "item_id", "rating")


def _looks_numeric(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_ratings(path: str | Path) -> pd.DataFrame:
    """``user_id`` (int64 or str), ``item_id`` (same), ``rating`` (float64) of a Parquet or TSV file.

    Parquet: the columns ``user_id``, ``item_id`` and ``rating``. TSV: the
    first three columns in that order, with or without a header row (a header
    is recognised by a third field that is not a number, as in MovieLens'
    ``rating:float``). A repeated (user, item) pair keeps its last row. Raises
    :class:`InputError` naming the file (and column) when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ratings file")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            missing = [column for column in COLUMNS if column not in frame.columns]
            if missing:
                raise InputError(
                    f"{path}: no column {', '.join(missing)} (has {', '.join(map(str, frame.columns))})"
                )
            frame = frame[list(COLUMNS)]
        else:
            with path.open() as handle:
                first = handle.readline().rstrip("\n").split("\t")
            if len(first) < 3:
                raise InputError(
                    f"{path}: line 1 has {len(first)} tab-separated fields, expected user, item, rating"
                )
            header = 0 if not _looks_numeric(first[2]) else None
            frame = pd.read_csv(path, sep="\t", header=header, usecols=[0, 1, 2])
            frame.columns = list(COLUMNS)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ratings ({exc})") from exc
    ratings = pd.to_numeric(frame["rating"], errors="coerce")
    if ratings.isna().any():
        row = int(np.flatnonzero(ratings.isna().to_numpy())[0])
        raise InputError(f"{path}: column rating, row {row}: {frame['rating'].iloc[row]!r} is not a number")
    frame = frame.assign(rating=ratings.astype(np.float64))
    frame = frame.drop_duplicates(["user_id", "item_id"], keep="last").reset_index(drop=True)
    if frame["user_id"].nunique() < 2 or frame["item_id"].nunique() < 2:
        raise InputError(f"{path}: needs at least two users and two items")
    return frame


@dataclass(frozen=True)
class Fold:
    """One of k folds: training and held-out ratings in one user × item index space.

    ``train`` and ``test`` hold ``user_id``/``item_id`` (original ids),
    ``user``/``item`` (int64 positions 0..n−1 over the whole file) and
    ``rating``. ``test`` keeps only pairs whose user and item both occur in
    ``train`` (no side can score a user or item it never saw; ``dropped``
    counts the others). The matrices are (n_users × n_items) CSR float64.
    """

    index: int
    train: pd.DataFrame
    test: pd.DataFrame
    dropped: int
    user_ids: np.ndarray
    """(n_users,) the original id of each user position."""
    item_ids: np.ndarray
    """(n_items,) the original id of each item position."""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def _matrix(self, frame: pd.DataFrame, values: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(
            (values, (frame["user"].to_numpy(), frame["item"].to_numpy())), shape=(self.n_users, self.n_items)
        )

    @property
    def train_seen(self) -> sp.csr_matrix:
        """1 at every training rating: the items never recommended back to their user."""
        return self._matrix(self.train, np.ones(len(self.train)))

    @property
    def train_likes(self) -> sp.csr_matrix:
        """1 at every training like (rating ≥ :data:`LIKE_THRESHOLD`): what the implicit references fit."""
        liked = self.train[self.train["rating"] >= LIKE_THRESHOLD]
        return self._matrix(liked, np.ones(len(liked)))

    @property
    def test_likes(self) -> sp.csr_matrix:
        """1 at every held-out like: the relevant items of recall@k and NDCG@k."""
        liked = self.test[self.test["rating"] >= LIKE_THRESHOLD]
        return self._matrix(liked, np.ones(len(liked)))


def k_folds(ratings: pd.DataFrame, k: int, seed: int) -> list[Fold]:
    """Split ``ratings`` into ``k`` folds: a seeded permutation, row j of it in fold j mod k.

    Every rating is held out exactly once; the folds differ in size by at
    most one rating before :class:`Fold` drops unknown users and items.
    """
    if k < 2:
        raise InputError(f"--folds {k}: needs at least 2 folds")
    user, users = pd.factorize(ratings["user_id"])
    item, items = pd.factorize(ratings["item_id"])
    indexed = ratings.assign(user=user.astype(np.int64), item=item.astype(np.int64))
    fold_of = np.empty(len(indexed), np.int64)
    fold_of[np.random.default_rng(seed).permutation(len(indexed))] = np.arange(len(indexed)) % k
    folds = []
    for index in range(k):
        held = fold_of == index
        train = indexed[~held].reset_index(drop=True)
        test = indexed[held]
        known = test["user"].isin(train["user"].unique()) & test["item"].isin(train["item"].unique())
        folds.append(
            Fold(
                index=index,
                train=train,
                test=test[known].reset_index(drop=True),
                dropped=int((~known).sum()),
                user_ids=np.asarray(users),
                item_ids=np.asarray(items),
            )
        )
    return folds


def inner_fold(fold: Fold, seed: int, k: int = 5) -> Fold:
    """One split of ``fold``'s training ratings alone (its first of ``k`` folds): where grids are chosen.

    The held-out ratings of ``fold`` take no part, so a configuration chosen
    here is tested on ratings it was not chosen on.
    """
    return k_folds(fold.train[list(COLUMNS)], k, seed)[0]
