"""Configs of older runs, upgraded in one step, and a run's recorded ``config.json`` against the config a resume
asks for.

:func:`upgrade_config` fills the fields that configs made before them lack (with the value that reproduces how
those runs behaved) and moves renamed fields; the trainer applies it before validation and ``evaluate.py`` to a
run's ``config.json``, so the rest of the code reads every field directly.

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

import ml_collections

from srrl.errors import ConfigError

logger = logging.getLogger(__name__)

FIXED = (
    "pretrained.model", "pretrained.revision", "family", "use_lora", "lora_rank", "lora_target_modules",
    "sample.resolution", "sample.num_steps", "seed", "algorithm", "split_step", "split_time", "resample_num",
    "curriculum.stage_cnt", "curriculum.split_left", "curriculum.split_right", "mixed_precision",
    "select.history_window",
)
SAFE = (
    "resume_from", "save_path", "exp_name", "curriculum.total_stages", "logging.", "eval.every", "eval.dtype",
    "sample.max_micro_batch", "train.timesteps_per_call", "train.save_interval", "train.num_checkpoint_limit",
    "reward.batch_size", "reward.remote_url", "reward.remote_timeout", "reward.remote_retries",
    "reward.local_files_only", "channels_last", "compile_denoiser", "train.gradient_checkpointing", "train.trust_probe",
)
#: Fields that moved: the old name -> the new one.
RENAMED: dict[str, str] = {**{f"eval.{name}": f"select.{name}"
                              for name in ("pos_threshold", "neg_threshold", "history_cnt", "history_window")},
                           "compile_unet": "compile_denoiser"}
#: Fields that configs of older runs lack, with the value that reproduces how those runs behaved.
UPGRADES: dict[str, Any] = {
    "family": "sd", "channels_last": False, "compile_denoiser": False, "train.gradient_checkpointing": False,
    "train.kl_coef": 0.0, "train.ema_decay": 0.0, "lora_target_modules": "to_q,to_k,to_v,to_out.0",
    "sample.merge_lora": False, "train.lr_warmup_steps": 0, "train.target_kl": 0.0, "train.timesteps_per_call": 1,
    "select.history_window": "appearance", "select.positives": "best", "eval.eta": 0.0, "eval.dtype": "",
    "eval.verifier": False, "eval.guidance_scale": 0.0, "train.trust_probe": False, "train.timestep_window": 0,
    "train.objective": "ppo", "sample.same_latent": False, "pretrained.text_encoder_3": True,
    "pretrained.max_sequence_length": 256, "reflect.inversion_iterations": 0, "train.nft_beta": 1.0,
    "train.nft_adv_clip": 5.0, "train.nft_old_decay_rate": 0.001, "train.nft_old_decay_cap": 0.5,
    "reward.batch_size": 16, "reward.dtype": "float32", "reward.remote_url": "http://127.0.0.1:8765/score",
}  # fmt: skip


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
    """The flat recorded config with renamed fields moved (:data:`RENAMED`) and the fields older runs lack filled
    in (:data:`UPGRADES`)."""
    flat = flatten(recorded)
    for old, new in RENAMED.items():
        if old in flat:
            flat.setdefault(new, flat.pop(old))
    for key, value in UPGRADES.items():
        flat.setdefault(key, value)
    return flat


def _section(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """The section holding field ``a.b.c`` (created where missing) and the field's last name."""
    *path, name = dotted.split(".")
    node = config
    for part in path:
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]
    return node, name


def set_fields(config: ml_collections.ConfigDict, items: list[str]) -> None:
    """``FIELD=VALUE`` strings (``train.learning_rate=1e-3``) into ``config``, each value cast to the type of the
    field it replaces (a flag is True for ``True`` only); a field the config lacks raises KeyError."""
    for item in items:
        key, value = item.split("=", 1)
        section, name = _section(config, key)
        old = section[name]
        section[name] = value == "True" if isinstance(old, bool) else type(old)(value)


def upgrade_config(config: ml_collections.ConfigDict) -> list[str]:
    """Upgrade ``config`` in place as :func:`upgrade` does (a preset of this version is left as it is); returns
    the fields it filled or moved."""
    changed: list[str] = []
    with config.unlocked():
        flat = flatten(config.to_dict())
        for old, new in RENAMED.items():
            if old in flat:
                section, name = _section(config, old)
                value = section[name]
                del section[name]
                if new not in flat:
                    target, new_name = _section(config, new)
                    target[new_name] = value
                    changed.append(f"{old} -> {new}")
        flat = flatten(config.to_dict())
        for key, value in UPGRADES.items():
            if key not in flat:
                section, name = _section(config, key)
                section[name] = value
                changed.append(key)
    return changed


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
