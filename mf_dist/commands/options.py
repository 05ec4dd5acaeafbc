"""Options every command on a published run shares: where its Dask workers come from, the device, quiet."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mf_dist.settings import DeviceName

WorkersOption = Annotated[Optional[int], typer.Option(help="Worker processes of the local Dask cluster.")]
SchedulerOption = Annotated[Optional[str], typer.Option(help="Join this Dask scheduler (tcp://host:port).")]
DeviceOption = Annotated[DeviceName, typer.Option(help="auto, cpu or cuda.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
