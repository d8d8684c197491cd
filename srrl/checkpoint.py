"""What a checkpoint holds beyond the LoRA, read back with every check before anything is applied.

``checkpoints/stage_NNN/`` holds the LoRA (:func:`srrl.models.save_lora`), ``optimizer.safetensors`` (AdamW's
tensors), ``accumulated_grads.safetensors`` (gradients pending across stages), ``state.json`` (stage, metrics
record, normalisation history, scheduler, scaler, accumulation counters) and, with ``train.ema_decay``, the
weight average's LoRA in ``ema/`` (:mod:`srrl.ema`). :func:`newest_intact` returns the
newest checkpoint that reads back whole and finite, saying which newer ones it passed over and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from srrl import rundir
from srrl.advantages import History, upgrade_history
from srrl.ema import EMA_DIR
from srrl.errors import LoadError
from srrl.models import read_lora

logger = logging.getLogger(__name__)

STATE_KEYS = ("stage", "record", "optimizer", "history", "accumulation")  # required in state.json


@dataclass
class Checkpoint:
    """A checkpoint read back and checked (:func:`read_checkpoint`), not yet applied."""

    path: Path
    stage: int
    state: dict  # state.json
    lora: dict[str, torch.Tensor]  # peft key format
    optimizer: dict  # an optimizer state_dict
    grads: dict[str, torch.Tensor]  # pending gradients by parameter name
    history: History
    ema: dict[str, torch.Tensor] | None  # the weight average's LoRA (peft key format); None when the run kept none


def _tensors(path: Path, required: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (:func:`srrl.rundir.load_tensors`), refused when any value is non-finite."""
    tensors = rundir.load_tensors(path, "checkpoint file", required)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoadError(f"{path} holds non-finite values ({bad[0]})")
    return tensors


def _check_optimizer(path: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Every AdamW moment in ``tensors`` has the shape of its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        if not idx.isdigit() or int(idx) >= len(params):
            raise LoadError(f"{path}: entry {name} names no parameter of this run's optimizer ({len(params)} params)")
        if key != "step" and value.shape != params[int(idx)].shape:
            raise LoadError(f"{path}: {name} has shape {tuple(value.shape)}, the parameter has "
                            f"{tuple(params[int(idx)].shape)}; check lora_rank and lora_target_modules")


def read_checkpoint(path: Path, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Read and check the checkpoint ``path`` against this run's ``denoiser`` and ``optimizer``; LoadError if any
    file is missing, truncated, mis-shaped or non-finite. Nothing of the run is changed."""
    state = rundir.read_json(path / "state.json", "checkpoint state")
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise LoadError(f"{path / 'state.json'} lacks some of {', '.join(STATE_KEYS)}")
    lora = read_lora(denoiser, path)
    opt_tensors = _tensors(path / "optimizer.safetensors", required=True)
    _check_optimizer(path / "optimizer.safetensors", opt_tensors, optimizer)
    try:
        opt_state = rundir.optimizer_from_flat(opt_tensors, state["optimizer"])
    except (KeyError, TypeError, ValueError) as err:
        raise LoadError(f"{path / 'state.json'}: optimizer entry malformed ({err})") from None
    grads = _tensors(path / "accumulated_grads.safetensors", required=False)
    names = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    if set(grads) - names:
        raise LoadError(f"{path / 'accumulated_grads.safetensors'} names parameters this run does not train")
    ema = read_lora(denoiser, path / EMA_DIR) if state.get("ema") else None
    return Checkpoint(path, int(state["stage"]), state, lora, opt_state, grads, upgrade_history(state["history"]),
                      ema)


def newest_intact(run_dir: Path, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that :func:`read_checkpoint` accepts (None when there is none);
    each newer one that fails is named in a warning with its reason."""
    for path in reversed(rundir.list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path, denoiser, optimizer)
        except LoadError as err:
            logger.warning("resume: checkpoint %s is damaged and is skipped: %s", path.name, err)
    return None
