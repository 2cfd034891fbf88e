"""Experiment trackers that live inside the run directory and use the metric names of metrics.jsonl.

transformers' own integrations rename every metric (`train/loss`, `eval/loss`) and write TensorBoard's and
wandb's files under the working directory, so two runs started from one folder mix their logs. Here
`training.report_to: [tensorboard, wandb, trackio]` writes `output_dir/tensorboard/`, `output_dir/wandb/` and
`output_dir/trackio/` (trackio's local SQLite store: `trackio show` with `TRACKIO_DIR` set there), logs every
record of metrics.jsonl under its own name at its step, the run's config once, and the results table at the end.
Other `report_to` values (mlflow, comet_ml, ...) are left to transformers' integrations.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

from vlm_orpo.errors import ConfigError

OURS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # report_to value -> its package


def take_trackers(args) -> list[str]:
    """The trackers of ours that `args.report_to` names, taken out of it (so Trainer's own stay off), each checked
    installed: a missing one is a one-line error that names the extra to install."""
    asked = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    asked = [name for name in asked if name and name != "none"]
    if "all" in asked:
        asked = [name for name, package in OURS.items() if importlib.util.find_spec(package) is not None]
    ours = [name for name in asked if name in OURS]
    for name in ours:
        if importlib.util.find_spec(OURS[name]) is None:
            raise ConfigError(f"training.report_to={name} needs the {OURS[name]} package: "
                              "pip install 'vlm-orpo[track]'")
    args.report_to = [name for name in asked if name not in OURS]
    return ours


class RunTrackers(TrainerCallback):
    """Logs to the trackers of `names` from the main process; `finish(table)` adds the results and closes them."""

    def __init__(self, names: list[str], out: Path, config: dict):
        self.names, self.out, self.config = names, Path(out), config
        self.tensorboard = self.wandb = self.trackio = None
        if "trackio" in names:
            point_trackio_at(self.out / "trackio")

    def _open(self) -> None:
        if "tensorboard" in self.names and self.tensorboard is None:
            import json

            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.out / "tensorboard"))
            self.tensorboard.add_text("config", f"```\n{json.dumps(self.config, indent=2, default=str)}\n```")
        if "wandb" in self.names and self.wandb is None:
            import wandb

            self.wandb = wandb.init(project="vlm-orpo", name=self.out.name, dir=str(self.out), config=self.config)
        if "trackio" in self.names and self.trackio is None:
            import trackio

            self.trackio = trackio.init(project="vlm-orpo", name=self.out.name, config=self.config, embed=False,
                                        auto_log_cpu=False, auto_log_gpu=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self._open()
        numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, state.global_step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=state.global_step)
        if self.trackio is not None:
            self.trackio.log(numbers, step=state.global_step)

    def finish(self, table: str) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_text("results", table)
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.summary["results"] = table
            self.wandb.finish()
        if self.trackio is not None:
            import trackio

            self.trackio.log({"results": trackio.Markdown(table)})
            self.trackio.finish()


def point_trackio_at(store: Path) -> None:
    """trackio reads its store's folder (TRACKIO_DIR) once, when it is imported: set it first, and refuse in one
    line a process in which trackio already writes elsewhere (a second run in one Python session)."""
    if "trackio" not in sys.modules:
        os.environ["TRACKIO_DIR"] = str(store)
    from trackio import utils

    if Path(utils.TRACKIO_DIR).resolve() != store.resolve():
        raise ConfigError(f"trackio already writes to {utils.TRACKIO_DIR} in this process; run `vlm-orpo train` in a "
                          f"new process to log into {store}")
