"""Start-up checks of a run's config: each problem is one line naming the field, its value and what is allowed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import ml_collections

from srrl.algorithms import ALGORITHMS


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line for the user."""


def load_prompt_file(path: str, field: str) -> list[str]:
    """The prompts of a JSON prompt file (a non-empty list of non-empty strings)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{field}={path!r}: file not found; expected a JSON list of prompt strings")
    try:
        prompts = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field}={path!r}: not valid JSON ({err.msg if hasattr(err, 'msg') else err}); "
                          "expected a JSON list of prompt strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"{field}={path!r}: expected a JSON list of non-empty prompt strings")
    if not prompts:
        raise ConfigError(f"{field}={path!r}: the prompt list is empty; expected at least one prompt")
    return prompts


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed; expected {allowed}")


LORA_TARGETS = "to_q,to_k,to_v,to_out.0"  # the default of config.lora_target_modules: attention projections
EVAL_DTYPES = ("", "float32", "bfloat16", "float16")  # eval.dtype: "" keeps the run's dtype


def lora_targets(config: ml_collections.ConfigDict) -> list[str]:
    """The module-name suffixes of ``config.lora_target_modules`` (comma-separated) that get LoRA adapters."""
    return [name.strip() for name in config.get("lora_target_modules", LORA_TARGETS).split(",") if name.strip()]


def validate_config(config: ml_collections.ConfigDict, known_rewards: Callable[[], list[str]]) -> None:
    """Raise :class:`ConfigError` for the first invalid value of ``config``; touches no model and no run dir."""
    s, t, cur, ev = config.sample, config.train, config.curriculum, config.eval
    for field, value in [
        ("sample.num_steps", s.num_steps),
        ("sample.batch_size", s.batch_size),
        ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
        ("sample.resolution", s.resolution),
        ("sample.max_micro_batch", s.max_micro_batch),
        ("train.batch_size", t.batch_size),
        ("train.num_epochs", t.num_epochs),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("train.save_interval", t.save_interval),
        ("train.num_checkpoint_limit", t.num_checkpoint_limit),
        ("curriculum.total_stages", cur.total_stages),
        ("curriculum.stage_cnt", cur.stage_cnt),
        ("eval.num_images_per_prompt", ev.num_images_per_prompt),
        ("lora_rank", config.lora_rank),
    ]:
        _require(isinstance(value, int) and value >= 1, field, value, "a positive integer")
    n = s.num_steps
    _require(config.split_step == 0 or 1 <= config.split_step <= n, "split_step", config.split_step,
             f"0 (use the curriculum) or 1..sample.num_steps={n}")
    _require(1 <= cur.split_left <= n, "curriculum.split_left", cur.split_left, f"1..sample.num_steps={n}")
    _require(cur.split_left <= cur.split_right <= n, "curriculum.split_right", cur.split_right,
             f"curriculum.split_left={cur.split_left}..sample.num_steps={n}")
    _require(isinstance(config.split_time, int) and config.split_time >= 2, "split_time", config.split_time,
             "an integer >= 2")
    _require(config.algorithm in ALGORITHMS, "algorithm", config.algorithm, f"one of {', '.join(ALGORITHMS)}")
    _require(config.algorithm == "srrl" or config.resample_num <= 0, "resample_num", config.resample_num,
             f"-1 or 0 with algorithm={config.algorithm!r} (only srrl runs reflection rounds)")
    _require(config.algorithm != "ddpo" or config.split_step in (0, s.num_steps), "split_step", config.split_step,
             f"0 or sample.num_steps={s.num_steps} with algorithm='ddpo' (DDPO trains every step)")
    _require(isinstance(config.seed, int) and 0 <= config.seed < 2**32 - 10_000, "seed", config.seed,
             "an integer in [0, 2**32 - 10000)")
    _require(config.resample_num >= -1, "resample_num", config.resample_num, "-1 (use the curriculum) or >= 0")
    _require(ev.pos_threshold >= ev.neg_threshold, "eval.pos_threshold", ev.pos_threshold,
             f">= eval.neg_threshold={ev.neg_threshold}")
    _require(ev.history_cnt >= 0, "eval.history_cnt", ev.history_cnt, "an integer >= 0")
    _require(ev.every >= 0, "eval.every", ev.every, "0 (no evaluation) or a positive integer")
    _require(ev.get("dtype", "") in EVAL_DTYPES, "eval.dtype", ev.get("dtype", ""),
             "one of " + ", ".join(repr(d) for d in EVAL_DTYPES))
    _require(s.eta >= 0, "sample.eta", s.eta, "a number >= 0")
    _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a positive number")
    _require(t.clip_range > 0, "train.clip_range", t.clip_range, "a positive number")
    channels_last = config.get("channels_last", False)
    _require(isinstance(channels_last, bool), "channels_last", channels_last, "True or False")
    merge = s.get("merge_lora", False)
    _require(isinstance(merge, bool), "sample.merge_lora", merge, "True or False")
    per_call = t.get("timesteps_per_call", 1)
    _require(isinstance(per_call, int) and per_call >= 1, "train.timesteps_per_call", per_call, "an integer >= 1")
    warmup = t.get("lr_warmup_steps", 0)
    _require(isinstance(warmup, int) and warmup >= 0, "train.lr_warmup_steps", warmup, "an integer >= 0 (0: none)")
    target_kl = t.get("target_kl", 0.0)
    _require(target_kl >= 0, "train.target_kl", target_kl, "0 (off) or a positive number")
    _require(config.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", config.mixed_precision,
             "one of no, fp16, bf16")
    _require(config.use_lora, "use_lora", config.use_lora, "True (only LoRA training is implemented)")
    targets = config.get("lora_target_modules", LORA_TARGETS)
    _require(isinstance(targets, str) and bool(lora_targets(config)), "lora_target_modules", targets,
             "comma-separated UNet module names, e.g. to_q,to_k,to_v,to_out.0 (add conv1,conv2 for resnets)")
    _require(config.logging.tracker in ("wandb", "tensorboard", "none"), "logging.tracker",
             config.logging.tracker, "one of wandb, tensorboard, none")
    _require(bool(config.pretrained.model), "pretrained.model", config.pretrained.model,
             "a hub model id or a local diffusers pipeline folder")
    known = known_rewards()
    _require(config.reward.fn in known, "reward.fn", config.reward.fn, f"one of: {', '.join(known)}")
    if not config.prompt:
        load_prompt_file(config.prompt_file, "prompt_file")
    if ev.every > 0:
        load_prompt_file(ev.prompt_file, "eval.prompt_file")
    if config.resume_from and not (Path(config.resume_from) / "config.json").is_file():
        raise ConfigError(f"resume_from={config.resume_from!r}: no run directory (config.json missing) there")
