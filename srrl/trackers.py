"""Where a run's results go: the run directory (JSONL, JSON, PNG) and accelerate's trackers."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import torch

from srrl import rundir
from srrl.plots import image_grid, plot_curves, save_png

logger = logging.getLogger(__name__)


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class StageLogger:
    """Writes the run-directory files on the main process and forwards scalars and grids to the tracker."""

    def __init__(self, accelerator, config: ml_collections.ConfigDict, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.config = config
        self.run_dir = run_dir
        self.tracker = config.logging.tracker
        if self.tracker == "none" or not accelerator.is_main_process:
            return
        init_kwargs = {}
        if self.tracker == "wandb":
            if not _wandb_has_key() and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
                logger.info("wandb: no API key configured, logging offline to %s/wandb", run_dir)
            init_kwargs["wandb"] = {"name": run_dir.name, "dir": str(run_dir)}
        accelerator.init_trackers(config.logging.project, config=_flat(config), init_kwargs=init_kwargs)

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
        if not self.accelerator.is_main_process:
            return
        rundir.write_jsonl(self.run_dir / "metrics.jsonl", list(metrics))
        rundir.write_json(self.run_dir / "history.json", history)
        plot_curves(metrics, evals, self.run_dir / "curves.png")
        scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, int | float)}
        if self.tracker != "none":
            self.accelerator.log(scalars, step=record["stage"])
        if self.config.logging.log_images:
            grid = image_grid(images, labels, columns=columns)
            save_png(grid, self.run_dir / "images" / f"{rundir.checkpoint_name(record['stage'])}.png")
            self._log_image(grid, record["stage"])

    def evaluation(self, record: dict, evals: Sequence[dict], metrics: Sequence[dict]) -> None:
        if not self.accelerator.is_main_process:
            return
        rundir.write_jsonl(self.run_dir / "eval.jsonl", list(evals))
        if metrics:
            plot_curves(metrics, evals, self.run_dir / "curves.png")
        if self.tracker != "none":
            scalars = {f"eval/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
            for family, parts in record.get("verifier", {}).items():
                scalars.update({f"eval/{family}/{k}": v for k, v in parts.items()})
            self.accelerator.log(scalars, step=max(record["after_stage"], 0))

    def _log_image(self, grid, step: int) -> None:
        if self.tracker == "wandb":
            import wandb

            self.accelerator.get_tracker("wandb").log({"images": wandb.Image(grid)}, step=step)
        elif self.tracker == "tensorboard":
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard").writer
            writer.add_image("images", np.asarray(grid), step, dataformats="HWC")

    def finish(self) -> None:
        if self.tracker != "none":
            self.accelerator.end_training()


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
