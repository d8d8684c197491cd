"""A run's recorded ``config.json`` against the config a resume asks for.

A resume continues the run that ``config.json`` describes. Fields that decide what the stages already done
mean (the model, the LoRA, the sampler's shape, the seeds and the curriculum) must not change: a resume that
changes them is refused in one line naming the fields. Fields in :data:`SAFE` may change freely (more
``curriculum.total_stages``, logging, evaluation frequency, memory and speed knobs). Any other change (for
example the learning rate) is accepted and listed in a warning; ``config.json`` is then rewritten with the
config that runs, so that later resumes and ``evaluate.py`` see it.
"""

from __future__ import annotations

import logging
from typing import Any

from srrl.errors import ConfigError

logger = logging.getLogger(__name__)

FIXED = (
    "pretrained.model", "pretrained.revision", "family", "use_lora", "lora_rank", "lora_target_modules",
    "sample.resolution", "sample.num_steps", "seed", "algorithm", "split_step", "split_time", "resample_num",
    "curriculum.stage_cnt", "curriculum.split_left", "curriculum.split_right", "mixed_precision",
    "eval.history_window",
)
SAFE = (
    "resume_from", "save_path", "exp_name", "curriculum.total_stages", "logging.", "eval.every", "eval.dtype",
    "sample.max_micro_batch", "train.timesteps_per_call", "train.save_interval", "train.num_checkpoint_limit",
    "reward.batch_size", "reward.remote_url", "reward.remote_timeout", "reward.remote_retries",
    "reward.local_files_only", "channels_last",
)
# Fields that configs of older runs lack, with the value that reproduces how those runs behaved.
UPGRADES: dict[str, Any] = {"eval.history_window": "appearance"}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def upgrade(recorded: dict) -> dict[str, Any]:
    """The flat recorded config with the fields older runs lack filled in (:data:`UPGRADES`)."""
    flat = flatten(recorded)
    for key, value in UPGRADES.items():
        flat.setdefault(key, value)
    return flat


def resume_changes(requested: dict, recorded: dict) -> list[str]:
    """The changed fields of a resume that are neither fixed nor safe (``"field: old -> new"``); raises
    ConfigError naming every changed field of :data:`FIXED`. Fields absent from either side are not compared."""
    new, old = flatten(requested), upgrade(recorded)
    changed = [k for k in new if k in old and new[k] != old[k]]
    fixed = [k for k in changed if k in FIXED]
    if fixed:
        what = "; ".join(f"{k}: the run has {old[k]!r}, asked {new[k]!r}" for k in fixed)
        raise ConfigError(f"resume_from: the run was made with other settings that cannot change mid-run ({what}); "
                          "pass the run's values (its config.json) or start a new run")
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed if not k.startswith(SAFE)]
