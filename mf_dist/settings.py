"""Training settings as the trainers read them, and the names every layer shares.

This module is the bottom of the settings: it imports nothing of mf-dist but
the errors, so the trainers, the registry and the run configuration can all
read it. :class:`~mf_dist.config.RunConfig` builds a :class:`TrainSettings`
with the model's defaults filled in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ModelName = Literal["cooccurrence", "explicit", "implicit", "nmf"]
SolverName = Literal["auto", "als", "gradient", "mu"]
OptimizerName = Literal["adam", "adagrad"]
AlsMethod = Literal["cg", "cholesky"]
CooccurrenceLoss = Literal["squared", "weighted"]
NmfTarget = Literal["cooccurrence", "ratings"]
XProducts = Literal["auto", "tiles", "likes"]
DuplicatePolicy = Literal["auto", "last", "sum", "mean", "error"]
DeviceName = Literal["auto", "cpu", "cuda"]


class TrainSettings(BaseModel):
    """The part of a run's configuration the train stage reads, with defaults resolved.

    ``tolerance`` stops training early once the loss improves by less than
    this fraction over an epoch (0 disables early stopping).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    solver: Literal["als", "gradient", "mu"]
    rank: int = Field(ge=1, le=1024)
    epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    regularization: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    optimizer: OptimizerName = "adam"
    alpha: float = Field(10.0, gt=0)
    als_method: Literal["cg", "cholesky"] = "cg"
    cg_steps: int = Field(3, ge=1)
    loss: Literal["squared", "weighted"] = "squared"
    weight_x_max: float = Field(100.0, gt=0)
    weight_power: float = Field(0.75, gt=0)
    log_target: bool = False
    target: Literal["cooccurrence", "ratings"] = "cooccurrence"
    x_products: XProducts = "auto"
    tolerance: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)
    device: DeviceName = "auto"
    resume: bool = False
    init_from: str | None = None
