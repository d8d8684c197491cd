"""Where a run's results go: the run directory (JSONL, JSON, PNG) and accelerate's trackers.

Trackers share one step axis, the number of stages completed: the evaluation before training is at step 0, the
training record of stage ``s`` and the evaluation after stage ``s`` at step ``s + 1``. The trainer logs in the
order evaluation(-1), then per stage the stage record and the evaluation after it, so steps never decrease
(wandb drops a log whose step is below the run's current step).
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
import torch
from PIL import Image

from srrl import rundir
from srrl.plots import image_grid, plot_curves, save_png

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under the run directory; accelerate adds a folder named after the project


def _wandb_has_key() -> bool:
    """Whether a wandb API key is configured (environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def step_after(stage: int) -> int:
    """The tracker step of what is logged after stage ``stage`` (-1: before training): stages completed."""
    return stage + 1


def log_into_run_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """Point ``accelerator``'s project and logging directories at ``run_dir`` (tensorboard logs under
    ``run_dir/tensorboard``); takes effect for trackers started by a later ``init_trackers``."""
    project = accelerator.project_configuration
    project.project_dir = str(run_dir)
    project.logging_dir = str(run_dir / TENSORBOARD_DIR)


class StageLogger:
    """Writes the run-directory files on the main process and forwards scalars and grids to the tracker."""

    def __init__(self, accelerator: Accelerator, config: ml_collections.ConfigDict, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.config = config
        self.run_dir = run_dir
        self.tracker = config.logging.tracker
        log_into_run_dir(accelerator, run_dir)
        if self.tracker == "none" or not accelerator.is_main_process:
            return
        init_kwargs = {}
        if self.tracker == "wandb":
            if not _wandb_has_key() and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
                logger.info("wandb: no API key configured, logging offline to %s/wandb", run_dir)
            init_kwargs["wandb"] = {"name": run_dir.name, "dir": str(run_dir)}
        accelerator.init_trackers(config.logging.project, config=_hparams(config), init_kwargs=init_kwargs)
        if not any(t.name == self.tracker for t in accelerator.trackers):
            logger.warning("logging.tracker=%s: the tracker did not start (is it installed, and was the Accelerator "
                           "made with log_with=%r?); logging to the run directory only", self.tracker, self.tracker)
            self.tracker = "none"
        elif self.tracker == "tensorboard":
            logger.info("tensorboard: logging to %s", accelerator.logging_dir)

    def stage(
        self,
        record: dict,
        metrics: Sequence[dict],
        evals: Sequence[dict],
        images: torch.Tensor,
        labels: Sequence[str],
        columns: int,
        history: dict,
    ) -> None:
        """Write metrics.jsonl, history.json, curves.png and the stage's image grid; log the record's scalars."""
        if not self.accelerator.is_main_process:
            return
        rundir.write_jsonl(self.run_dir / "metrics.jsonl", list(metrics))
        rundir.write_json(self.run_dir / "history.json", history)
        plot_curves(metrics, evals, self.run_dir / "curves.png")
        step = step_after(record["stage"])
        if self.tracker != "none":
            scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, int | float)}
            self.accelerator.log(scalars, step=step)
        if self.config.logging.log_images:
            grid = image_grid(images, labels, columns=columns)
            save_png(grid, self.run_dir / "images" / f"{rundir.checkpoint_name(record['stage'])}.png")
            self._log_image(grid, step)

    def evaluation(self, record: dict, evals: Sequence[dict], metrics: Sequence[dict]) -> None:
        """Write eval.jsonl (and curves.png once there are stages); log the evaluation's scalars."""
        if not self.accelerator.is_main_process:
            return
        rundir.write_jsonl(self.run_dir / "eval.jsonl", list(evals))
        if metrics:
            plot_curves(metrics, evals, self.run_dir / "curves.png")
        if self.tracker != "none":
            scalars = {f"eval/{k}": v for k, v in record.items() if isinstance(v, int | float)}
            for family, parts in record.get("verifier", {}).items():
                scalars.update({f"eval/{family}/{k}": v for k, v in parts.items()})
            self.accelerator.log(scalars, step=step_after(record["after_stage"]))

    def _log_image(self, grid: Image.Image, step: int) -> None:
        """Send ``grid`` to the tracker at ``step``."""
        if self.tracker == "wandb":
            import wandb

            self.accelerator.get_tracker("wandb").log({"images": wandb.Image(grid)}, step=step)
        elif self.tracker == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)  # the SummaryWriter
            writer.add_image("images", np.asarray(grid), step, dataformats="HWC")
            writer.flush()

    def finish(self) -> None:
        """Close the trackers (flushes tensorboard, ends the wandb run)."""
        if self.tracker != "none":
            self.accelerator.end_training()


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """``config`` as one level of dotted keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _hparams(config: ml_collections.ConfigDict) -> dict:
    """The flat config with every value a tracker takes (tensorboard's hparams refuse lists, tuples, dicts):
    numbers, strings, booleans and None as they are, anything else as its ``str``."""
    return {k: v if v is None or isinstance(v, bool | int | float | str) else str(v) for k, v in _flat(config).items()}
