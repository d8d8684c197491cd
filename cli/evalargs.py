"""The command-line checks of ``evaluate.py``: a bad flag, run config or stage selection is one line.

A flag's error names the flag, its value and what is allowed (:class:`ConfigError`); a run's ``config.json``
that cannot be read, is not a JSON object or lacks a field ``evaluate.py`` reads is a :class:`LoadError`
naming the file.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import ml_collections
import torch
from safetensors import safe_open

from rewards.common import parse_option_pairs
from srrl.distributed import WEIGHT_DTYPES
from srrl.errors import ConfigError, LoadError
from srrl.models import LORA_WEIGHTS
from srrl.runconfig import upgrade_config
from srrl.rundir import list_checkpoints, read_json
from srrl.validate import EVAL_DTYPES

logger = logging.getLogger(__name__)

# The fields of a run's config.json that evaluate.py reads (the others have defaults or are optional).
RUN_CONFIG_FIELDS = (
    "pretrained.model", "pretrained.revision", "sample.resolution", "sample.num_steps",
    "sample.guidance_scale", "sample.max_micro_batch", "eval.seed", "eval.prompt_file",
    "eval.num_images_per_prompt", "reward.fn", "lora_rank", "mixed_precision",
)
STAGES_ALLOWED = "'all', 'last' or comma-separated stage numbers such as 0,4,9"
_RESTORE = "restore the config.json the trainer wrote, or pass --from_run_config=false and --config"


def _has(data: Any, dotted: str) -> bool:
    """Whether the nested dict ``data`` holds the field ``a.b.c``."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
    """The config of ``<run_dir>/config.json``; a missing, malformed or incomplete file is one line."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"run_dir={run_dir!r} has no config.json; pass --from_run_config=false and a "
                          "--config")
    data = read_json(path, "run config")
    if not isinstance(data, dict):
        raise LoadError(f"run config {path} holds a JSON {type(data).__name__}, not an object; {_RESTORE}")
    missing = [field for field in RUN_CONFIG_FIELDS if not _has(data, field)]
    if missing:
        raise LoadError(f"run config {path} lacks {', '.join(missing)}; {_RESTORE}")
    config = ml_collections.ConfigDict(data)
    upgrade_config(config)
    return config


def parse_stages(stages: str) -> str | list[int]:
    """``'all'``, ``'last'`` or the sorted distinct stage numbers of ``--stages``."""
    text = stages.strip()
    if text in ("all", "last"):
        return text
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", part) for part in parts):
        raise ConfigError(f"--stages={stages!r} is not allowed; expected {STAGES_ALLOWED}")
    return sorted({int(part) for part in parts})


def _stage_number(checkpoint: Path) -> int | None:
    """The stage of a ``stage_NNN`` folder (None for another name)."""
    suffix = checkpoint.name.removeprefix("stage_")
    return int(suffix) if re.fullmatch(r"[0-9]+", suffix) else None


def stage_checkpoints(run_dir: str, stages: str) -> list[Path]:
    """The checkpoint folders of ``run_dir`` that ``--stages`` selects, oldest first. A stage the run has no
    checkpoint for is refused, naming the stages it has; ``all`` of a run without checkpoints is a warning."""
    chosen = parse_stages(stages)
    if not run_dir:
        if chosen != "all":
            raise ConfigError(f"--stages={stages!r} selects checkpoints of a --run_dir; give --run_dir")
        return []
    numbered = {_stage_number(path): path for path in list_checkpoints(Path(run_dir))}
    found = {stage: numbered[stage] for stage in sorted(s for s in numbered if s is not None)}
    if not found:
        where = f"run_dir={run_dir!r} has no checkpoints (checkpoints/stage_NNN with a state.json)"
        if chosen != "all":
            raise ConfigError(f"--stages={stages!r}: {where}")
        logger.warning("%s; evaluating none of its stages", where)
        return []
    if chosen in ("all", "last"):
        return list(found.values()) if chosen == "all" else [found[max(found)]]
    missing = [str(stage) for stage in chosen if stage not in found]
    if missing:
        raise ConfigError(f"--stages={stages!r}: run_dir={run_dir!r} has no checkpoint for stage "
                          f"{', '.join(missing)}; its checkpoints are stages {', '.join(map(str, found))}")
    return [found[stage] for stage in chosen]


def check_lora_file(checkpoint: Path) -> None:
    """A first, model-free check of a checkpoint's LoRA file: present, with a safetensors header that covers
    the file, so that an empty or truncated file is refused before any model loads (``read_lora`` checks
    the tensors against the UNet later)."""
    path = checkpoint / LORA_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} holds no {LORA_WEIGHTS}")
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        why = (str(err).splitlines() or [type(err).__name__])[0][:120]
        message = f"LoRA file {path} is unreadable ({why}): truncated or not a safetensors file"
        raise LoadError(message) from None


def available_devices() -> list[str]:
    """The devices this machine can evaluate on: ``cpu``, each CUDA GPU and ``mps`` where present."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    apple = ["mps"] if mps is not None and mps.is_available() else []
    return ["cpu", *(f"cuda:{i}" for i in range(gpus)), *apple]


def resolve_device(name: str) -> torch.device:
    """``--device`` (default: cuda when available, else cpu); a device this machine lacks is refused."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    listed = f"available devices: {', '.join(available_devices())}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device={name!r} is not a device name; {listed}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device={name!r}: CUDA is not available on this machine ({why}); {listed}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device={name!r}: there is no CUDA device {device.index}; {listed}")
    elif device.type != "cpu" and device.type not in available_devices():
        raise ConfigError(f"--device={name!r} is not available on this machine; {listed}")
    return device


def check_integer(name: str, value: Any, minimum: int) -> None:
    """ConfigError unless ``value`` is an integer >= ``minimum`` (a bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name}={value!r} is not allowed; expected {allowed}")


def check_number(name: str, value: Any, minimum: float) -> None:
    """ConfigError unless ``value`` is a finite number >= ``minimum``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed; expected a finite number >= {minimum:g}")


def check_flags(values: dict[str, Any]) -> None:
    """The numeric flags of ``evaluate.py`` (``{flag: value}``, None for a flag that is not given)."""
    for flag, minimum in (("batch_size", 1), ("num_images_per_prompt", 1), ("num_steps", 1), ("seed", 0)):
        if values.get(flag) is not None:
            check_integer(f"--{flag}", values[flag], minimum)
    if values.get("guidance_scale") is not None:
        check_number("--guidance_scale", values["guidance_scale"], 0.0)


def set_field(config: ml_collections.ConfigDict, key: str, value: Any, source: str) -> None:
    """``config.<key> = value`` (``key`` dotted; a new last part is added). A value ml_collections refuses for
    the field's type is a ConfigError naming ``source`` (the flag that gave it)."""
    *sections, field = key.split(".")
    with config.unlocked():
        parent = config
        for name in sections:
            parent = parent[name]
        try:
            parent[field] = value
        except TypeError:
            kind = type(parent[field]).__name__
            raise ConfigError(f"{source}: {key}={value!r} is not allowed; {key} is a {kind}") from None


def check_config(config: ml_collections.ConfigDict) -> None:
    """The values that decide the images, after the flags' overrides (a run's config.json may hold any)."""
    s, e = config.sample, config.eval
    for field, value, minimum in (
        ("sample.num_steps", s.num_steps, 1), ("sample.resolution", s.resolution, 1),
        ("sample.max_micro_batch", s.max_micro_batch, 1), ("eval.seed", e.seed, 0),
        ("eval.num_images_per_prompt", e.num_images_per_prompt, 1), ("lora_rank", config.lora_rank, 1),
    ):
        check_integer(f"config {field}", value, minimum)
    check_number("config sample.guidance_scale", s.guidance_scale, 0.0)
    check_number("config eval.eta", e.eta, 0.0)
    check_number("config eval.guidance_scale", e.guidance_scale, 0.0)
    for field, value, allowed in (("mixed_precision", config.mixed_precision, tuple(WEIGHT_DTYPES)),
                                  ("eval.dtype", e.dtype, EVAL_DTYPES)):
        if value not in allowed:
            raise ConfigError(f"config {field}={value!r} is not allowed; expected one of {allowed}")


def apply_flags(config: ml_collections.ConfigDict, values: dict[str, Any], reward_options: list[str]) -> None:
    """Set the fields that flags override (``{field: value}``, None: not given; each flag is named after its
    field's last part) and the ``--reward_option`` pairs (``reward.KEY``), then :func:`check_config`. A given
    ``sample.guidance_scale`` also sets ``eval.guidance_scale`` to 0, so that ``--guidance_scale`` is the held-out
    scale whatever the run's own (:func:`srrl.stage.heldout_guidance_scale`)."""
    for key, value in values.items():
        if value is not None:
            set_field(config, key, value, f"--{key.split('.')[-1]}")
    if values.get("sample.guidance_scale") is not None:
        set_field(config, "eval.guidance_scale", 0.0, "--guidance_scale")
    try:
        options = parse_option_pairs(reward_options)
    except ValueError as err:
        raise ConfigError(f"--reward_option: {err}") from None
    for key, value in options.items():
        set_field(config, f"reward.{key}", value, "--reward_option")
    check_config(config)
