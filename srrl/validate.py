"""Start-up checks of a run's config: each problem is one line naming the field, its value and what is allowed.

Every field of ``config/stage_process.py`` has a rule here: integers are ints in a range, floats are finite
numbers in a range, flags are bools, enumerations are one of their values, names are plain names. A value
that would train the wrong way, poison the weights or crash a later stage is refused before anything loads.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

from srrl.advantages import HISTORY_WINDOWS, POSITIVES
from srrl.algorithms import ALGORITHMS, get_algorithm
from srrl.errors import ConfigError, LoadError

__all__ = ["ConfigError", "LoadError", "load_prompt_file", "lora_targets", "validate_config"]


def load_prompt_entries(path: str, field: str) -> list[dict[str, Any]]:
    """The entries of a JSON prompt file: a non-empty list whose items are prompt strings or objects with a
    ``"prompt"`` string and any other fields (metadata for rewards, e.g. ``{"prompt": "two cats", "count": 2}``).
    Each entry comes back as a dict with at least ``"prompt"``; a prompt may appear with one metadata only."""
    file = Path(path)
    expected = "expected a JSON list of prompt strings or {\"prompt\": ...} objects"
    if not file.is_file():
        raise ConfigError(f"{field}={path!r}: file not found; {expected}")
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field}={path!r}: not valid JSON ({err.msg if hasattr(err, 'msg') else err}); "
                          f"{expected}") from None
    if not isinstance(items, list):
        raise ConfigError(f"{field}={path!r}: {expected}")
    if not items:
        raise ConfigError(f"{field}={path!r}: the prompt list is empty; expected at least one prompt")
    entries: dict[str, dict[str, Any]] = {}
    for k, item in enumerate(items):
        entry = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ConfigError(f"{field}={path!r}: entry {k} is {str(item)[:60]!r}; {expected} (non-empty prompts)")
        if entries.get(entry["prompt"], entry) != entry:
            raise ConfigError(f"{field}={path!r}: prompt {entry['prompt']!r} appears with two different metadata")
        entries[entry["prompt"]] = entry
    return [entries[e["prompt"] if isinstance(e, dict) else e] for e in items]


def load_prompt_file(path: str, field: str) -> list[str]:
    """The prompts of a JSON prompt file (see :func:`load_prompt_entries`), in file order."""
    return [entry["prompt"] for entry in load_prompt_entries(path, field)]


def prompt_metadata(*entry_lists: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Prompt -> its metadata (the entry's fields other than ``"prompt"``), for the prompts that have any."""
    return {e["prompt"]: {k: v for k, v in e.items() if k != "prompt"} for entries in entry_lists for e in entries
            if len(e) > 1}


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise the one-line :class:`ConfigError` of ``field=value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed; expected {allowed}")


LORA_TARGETS = "to_q,to_k,to_v,to_out.0"  # the default of config.lora_target_modules: attention projections
EVAL_DTYPES = ("", "float32", "bfloat16", "float16")  # eval.dtype: "" keeps the run's dtype
# reward.dtype, any case: the names rewards.common.DTYPES accepts (the core does not import the rewards)
REWARD_DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "half", "bf16")
_MISSING = object()  # a field that a config of an older run lacks: its reader's default applies, nothing to check


class Span(NamedTuple):
    """The finite numbers from ``low`` to ``high`` (None: unbounded); ``strict`` leaves ``low`` out and ``below``
    leaves ``high`` out; ``allowed`` replaces the generated description."""

    low: float | None = None
    high: float | None = None
    strict: bool = False
    below: bool = False
    allowed: str = ""

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is a finite number (not a bool) in the span."""
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return False
        return self.high is None or (value < self.high if self.below else value <= self.high)

    def describe(self) -> str:
        """What the span allows, e.g. ``a finite number in [0, 1)``."""
        if self.allowed:
            return self.allowed
        if self.low is not None and self.high is not None:
            return f"a finite number in {'(' if self.strict else '['}{self.low:g}, {self.high:g}{')' if self.below else ']'}"
        if self.low is not None:
            return f"a finite number {'>' if self.strict else '>='} {self.low:g}"
        return "a finite number"


# (field, smallest, largest or None, what is allowed ("" generates it)): an int, never a bool or a float
INTEGERS: tuple[tuple[str, int, int | None, str], ...] = (
    ("seed", 0, 2**32 - 10_001, "an integer in [0, 2**32 - 10000)"),
    ("prompt_random_choose", 0, 1, "1 (draw prompts at random) or 0 (round-robin)"),
    ("lora_rank", 1, None, ""),
    ("pretrained.max_sequence_length", 1, 512, ""),
    ("split_time", 2, None, ""),
    ("curriculum.total_stages", 1, None, ""),
    ("curriculum.stage_cnt", 1, None, ""),
    ("sample.num_steps", 1, None, ""),
    ("sample.batch_size", 1, None, ""),
    ("sample.num_batches_per_epoch", 1, None, ""),
    ("sample.resolution", 1, None, ""),
    ("sample.max_micro_batch", 1, None, ""),
    ("train.batch_size", 1, None, ""),
    ("train.timesteps_per_call", 1, None, "an integer >= 1"),
    ("train.num_epochs", 1, None, ""),
    ("train.gradient_accumulation_steps", 1, None, ""),
    ("train.lr_warmup_steps", 0, None, "an integer >= 0 (0: none)"),
    ("train.save_interval", 1, None, ""),
    ("train.num_checkpoint_limit", 1, None, ""),
    ("select.history_cnt", 0, None, ""),
    ("eval.every", 0, None, "0 (no evaluation) or a positive integer"),
    ("eval.num_images_per_prompt", 1, None, ""),
    ("eval.seed", 0, None, ""),
    ("reward.batch_size", 1, None, ""),
    ("reward.jpeg_quality", 1, 100, ""),
    ("reward.remote_retries", 0, None, ""),
    ("reflect.inversion_iterations", 0, None, "an integer >= 0 (0: the plain inversion)"),
)
# (field, span): a finite int or float in the span
NUMBERS: tuple[tuple[str, Span], ...] = (
    ("reflect.forward_guidance_scale", Span(0)),
    ("reflect.inverse_guidance_scale", Span(0)),
    ("sample.eta", Span(0, strict=True, allowed="a finite number > 0 (eta 0 samples deterministically: the "
                                               "log-probs are 0 and nothing trains)")),
    ("sample.guidance_scale", Span(0)),
    ("train.learning_rate", Span(0, strict=True)),
    ("train.adam_beta1", Span(0, 1, below=True)),
    ("train.adam_beta2", Span(0, 1, below=True)),
    ("train.adam_weight_decay", Span(0)),
    ("train.adam_epsilon", Span(0, strict=True)),
    ("train.max_grad_norm", Span(0, strict=True)),
    ("train.clip_range", Span(0, strict=True)),
    ("train.kl_coef", Span(0)),
    ("train.ema_decay", Span(0, 1, below=True, allowed="0 (off) or a finite number in (0, 1)")),
    ("train.target_kl", Span(0, allowed="0 (off) or a finite positive number")),
    ("train.adv_clip_max", Span(0, strict=True)),
    ("train.beta1", Span(0)),
    ("train.nft_beta", Span(0, strict=True)),
    ("train.nft_adv_clip", Span(0, strict=True)),
    ("train.nft_old_decay_rate", Span(0)),
    ("train.nft_old_decay_cap", Span(0, 1, below=True, allowed="a finite number in [0, 1)")),
    ("train.beta2", Span(0)),
    ("select.pos_threshold", Span()),
    ("select.neg_threshold", Span()),
    ("eval.eta", Span(0)),
    ("eval.guidance_scale", Span(0, allowed="a finite number >= 0 (0: sample.guidance_scale)")),
    ("reward.remote_timeout", Span(0, strict=True, allowed="a finite number of seconds > 0")),
)
FLAGS = (
    "allow_tf32", "pretrained.text_encoder_3", "channels_last", "compile_denoiser", "train.gradient_checkpointing", "train.trust_probe", "use_lora",
    "sample.merge_lora", "sample.same_latent", "train.flush_accumulation_at_stage_end",
    "eval.verifier", "reward.local_files_only", "logging.log_images",
)  # fmt: skip
# (field, the values allowed)
CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("algorithm", ALGORITHMS),
    ("mixed_precision", ("no", "fp16", "bf16")),
    ("select.history_window", HISTORY_WINDOWS),
    ("select.positives", POSITIVES),
    ("eval.dtype", EVAL_DTYPES),
    ("reward.remote_dtype", ("uint8", "float32")),
    ("reward.hpsv2_version", ("v2.0", "v2.1")),
    ("logging.tracker", ("wandb", "tensorboard", "none")),
)
STRINGS = (  # config.family too; its values are the entry wiring's (cli.wiring.FAMILIES)
    "family", "prompt_file", "prompt", "lora_target_modules", "resume_from", "pretrained.model", "pretrained.revision",
    "eval.prompt_file", "reward.fn", "reward.dtype", "reward.clip_model", "reward.pickscore_model",
    "reward.pickscore_processor", "reward.aesthetic_clip_model", "reward.aesthetic_mlp", "reward.image_reward_model",
    "reward.image_reward_cache", "reward.vqa_model", "reward.vqa_cache_dir", "reward.hpsv2_checkpoint",
    "reward.remote_url", "logging.project",
)  # fmt: skip


def _is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    """The value of the dotted ``field`` of ``config``, or :data:`_MISSING` where the config lacks it."""
    node: Any = config
    for name in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict | dict) or name not in node:
            return _MISSING
        node = node[name]
    return node


def lora_targets(config: ml_collections.ConfigDict) -> list[str]:
    """The module-name suffixes of ``config.lora_target_modules`` (comma-separated) that get LoRA adapters."""
    return [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]


def _check_field_types(config: ml_collections.ConfigDict) -> None:
    """Each field of the tables above: its type and its range (integers and numbers first, so that the
    cross-field rules after these see sound values)."""
    for field, low, high, allowed in INTEGERS:
        if (value := _get(config, field)) is not _MISSING:
            default = f"an integer in {low}..{high}" if high is not None else (
                "a positive integer" if low == 1 else f"an integer >= {low}")
            _require(_is_int(value) and value >= low and (high is None or value <= high), field, value,
                     allowed or default)
    for field, span in NUMBERS:
        if (value := _get(config, field)) is not _MISSING:
            _require(span.holds(value), field, value, span.describe())
    for field in FLAGS:
        if (value := _get(config, field)) is not _MISSING:
            _require(isinstance(value, bool), field, value, "True or False")
    for field in STRINGS:
        if (value := _get(config, field)) is not _MISSING:
            _require(isinstance(value, str), field, value, "a string")
    # imported here: the objectives import srrl.models, which imports this module
    from srrl.objectives import OBJECTIVES

    for field, choices in (*CHOICES, ("train.objective", tuple(OBJECTIVES))):
        if (value := _get(config, field)) is not _MISSING:
            _require(value in choices, field, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_names(config: ml_collections.ConfigDict) -> None:
    """The run directory ``<save_path>/<exp_name>``, the model and the LoRA: names that cannot point elsewhere."""
    name = config.exp_name
    plain = (isinstance(name, str) and bool(name.strip()) and name not in (".", "..")
             and not any(char in name for char in "/\\\0"))
    _require(plain, "exp_name", name, "a plain folder name (not empty, not . or .., no / \\ or NUL)")
    save_path = config.save_path
    _require(isinstance(save_path, str) and bool(save_path.strip()) and "\0" not in save_path, "save_path",
             save_path, "a non-empty folder path")
    _require(config.use_lora, "use_lora", config.use_lora, "True (only LoRA training is implemented)")
    targets = config.lora_target_modules
    _require(bool(lora_targets(config)), "lora_target_modules", targets,
             "comma-separated denoiser module names, e.g. to_q,to_k,to_v,to_out.0 (add conv1,conv2 for resnets)")
    _require(bool(config.pretrained.model.strip()), "pretrained.model", config.pretrained.model,
             "a hub model id or a local diffusers pipeline folder")


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    """The split steps and reflection rounds against ``sample.num_steps`` and the algorithm."""
    n, cur = config.sample.num_steps, config.curriculum
    _require(_is_int(config.split_step) and (config.split_step == 0 or 1 <= config.split_step <= n), "split_step",
             config.split_step, f"0 (use the curriculum) or 1..sample.num_steps={n}")
    window = config.train.timestep_window
    _require(_is_int(window) and -n < window <= n, "train.timestep_window", window,
             f"0 (every post-fork step), 1..sample.num_steps={n} (the first W) or -{n - 1}..-1 (all but the last -W)")
    _require(_is_int(cur.split_left) and 1 <= cur.split_left <= n, "curriculum.split_left", cur.split_left,
             f"1..sample.num_steps={n}")
    _require(_is_int(cur.split_right) and cur.split_left <= cur.split_right <= n, "curriculum.split_right",
             cur.split_right, f"curriculum.split_left={cur.split_left}..sample.num_steps={n}")
    _require(_is_int(config.resample_num) and config.resample_num >= -1, "resample_num", config.resample_num,
             "-1 (use the curriculum) or an integer >= 0")
    algorithm = get_algorithm(config.algorithm)
    _require(algorithm.reflect or config.resample_num <= 0, "resample_num", config.resample_num,
             f"-1 or 0 with algorithm={config.algorithm!r} (it runs no reflection rounds)")
    _require(algorithm.fork or config.split_step in (0, n), "split_step", config.split_step,
             f"0 or sample.num_steps={n} with algorithm={config.algorithm!r} (it does not fork: every step trains)")
    fewest = (config.split_step or cur.split_left) if algorithm.fork else n  # fewest post-fork steps of a stage
    _require(window >= 0 or fewest > -window, "train.timestep_window", window,
             f"a W with -W below the fewest post-fork steps of a stage ({fewest}: split_step or "
             "curriculum.split_left), or W >= 0: dropping the last -W steps would leave nothing to train")


def _check_training(config: ml_collections.ConfigDict, known_rewards: Callable[[], list[str]]) -> None:
    """Rules between fields of ``train``, ``select`` and ``reward``, and the reward's name and options."""
    t, sel, reward = config.train, config.select, config.reward
    _require(t.beta1 > 0 or t.beta2 > 0, "train.beta2", t.beta2,
             "a number > 0 when train.beta1=0 (both 0: every advantage is 0 and nothing trains)")
    _require(sel.pos_threshold >= sel.neg_threshold, "select.pos_threshold", sel.pos_threshold,
             f">= select.neg_threshold={sel.neg_threshold}")
    known = known_rewards()
    _require(reward.fn in known, "reward.fn", reward.fn, f"one of: {', '.join(known)}")
    dtype = reward.dtype
    _require(dtype.lower() in REWARD_DTYPES, "reward.dtype", dtype,
             "one of float32, float16, bfloat16 (or fp32, fp16, half, bf16)")
    url = reward.remote_url
    try:
        parts = urllib.parse.urlsplit(url)
        ok_url = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a port that is not a number, or out of range
        ok_url = False
    _require(ok_url, "reward.remote_url", url, "http://HOST:PORT/score")


PromptCheck = Callable[[str], object]  # raises ValueError for a prompt it cannot read


def _check_grammar(prompts: list[str], check: PromptCheck, field: str, source: str, why: str) -> None:
    """ConfigError for the first of ``prompts`` that ``check`` refuses."""
    for prompt in prompts:
        try:
            check(prompt)
        except ValueError as err:
            raise ConfigError(f"{field}={source!r}: {err} ({why})") from None


def _check_prompts(config: ml_collections.ConfigDict, reward_check: PromptCheck | None,
                   verifier_check: PromptCheck | None) -> None:
    """The training and held-out prompt files, and their grammar where the reward (``reward_check``) or the
    held-out verifier (``verifier_check``) reads every prompt."""
    fn, ev = config.reward.fn, config.eval
    prompts = [config.prompt] if config.prompt else load_prompt_file(config.prompt_file, "prompt_file")
    if reward_check is not None:
        field, source = ("prompt", config.prompt) if config.prompt else ("prompt_file", config.prompt_file)
        _check_grammar(prompts, reward_check, field, source, f"reward.fn={fn!r} verifies every training prompt")
    if ev.every > 0:
        held_out = load_prompt_file(ev.prompt_file, "eval.prompt_file")
        if ev.verifier and verifier_check is None:
            raise ConfigError("eval.verifier=True: no verifier was handed in (the entry wiring hands in the "
                              "shapes-world verifier: run through train.py, or pass cli.wiring.VERIFIER); expected False")
        if ev.verifier:
            _check_grammar(held_out, verifier_check, "eval.prompt_file", ev.prompt_file,
                           "eval.verifier=True checks every held-out prompt")
        elif reward_check is not None:
            _check_grammar(held_out, reward_check, "eval.prompt_file", ev.prompt_file,
                           f"reward.fn={fn!r} verifies every held-out prompt")


def validate_config(config: ml_collections.ConfigDict, known_rewards: Callable[[], list[str]],
                    reward_check: PromptCheck | None = None, verifier_check: PromptCheck | None = None) -> None:
    """Raise :class:`ConfigError` for the first invalid value of ``config``; touches no model and no run dir
    (it reads the prompt files only). ``reward_check`` / ``verifier_check``: the prompt checks of the reward
    (``rewards.rewards.prompt_check``) and of the handed-in held-out verifier (:class:`srrl.heldout.Verifier`)."""
    _check_field_types(config)
    _check_names(config)
    _check_schedule(config)
    _check_training(config, known_rewards)
    _check_prompts(config, reward_check, verifier_check)
    if config.resume_from and not (Path(config.resume_from) / "config.json").is_file():
        raise ConfigError(f"resume_from={config.resume_from!r}: no run directory (config.json missing) there")
