"""Every field of every preset has a rule: a value that would train the wrong way, poison the weights or crash a
later stage is a one-line ConfigError naming the field, raised by ``validate_config`` before anything loads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from cli.wiring import VERIFIER
from config.stage_process import PRESETS, get_config
from rewards.rewards import known_rewards, prompt_check
from srrl.validate import CHOICES, FLAGS, ConfigError, validate_config

ROOT = Path(__file__).resolve().parent.parent

# (field, value) pairs of the walk below that are valid, with the reason; every other NaN, inf, -inf and -1 of
# a numeric field must be refused.
ALLOWED = {
    ("resample_num", -1): "-1 means: the curriculum decides the number of reflection rounds",
    ("select.neg_threshold", -1.0): "a z-score threshold; negatives are the normal case (the default is -0.5)",
}
#: values that a preset may allow or refuse, depending on its other fields (the refusal is then tested elsewhere)
EITHER = {
    ("train.timestep_window", -1): "all but the last step: refused only where a stage may fork at the last step",
}
BAD_NUMBERS = (math.nan, math.inf, -math.inf, -1)


def numeric_fields(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted field, value)`` of every int or float (not bool) leaf of the nested dict ``tree``."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += numeric_fields(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", value))
    return out


def with_value(config: ml_collections.ConfigDict, field: str, value: Any) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``field`` set to ``value``, of any type (built from a dict: an int field can hold
    NaN, as in a hand-edited config.json; ml_collections' type checks refuse it on assignment)."""
    tree = config.to_dict()
    *sections, name = field.split(".")
    node = tree
    for section in sections:
        node = node[section]
    node[name] = value
    return ml_collections.ConfigDict(tree)


def refusal(config: ml_collections.ConfigDict) -> str | None:
    """The ConfigError message of ``config``, or None if it validates."""
    try:
        validate_config(config, known_rewards, prompt_check(config.reward.fn), VERIFIER.check_prompt)
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates_offline(preset):
    """The presets themselves (sd14 and sdxl name hub models that are not on disk: nothing is loaded)."""
    assert refusal(get_config(preset)) is None


@pytest.mark.parametrize("preset", PRESETS)
def test_every_numeric_field_refuses_nan_inf_and_negative(preset):
    config = get_config(preset)
    fields = numeric_fields(config.to_dict())
    assert len(fields) > 40, fields  # the walk sees the whole config
    problems = []
    for field, default in fields:
        for bad in BAD_NUMBERS:
            value = float(bad) if isinstance(default, float) else bad
            message = refusal(with_value(config, field, value))
            if (field, value) in EITHER and (message is None or message.startswith(f"{field}=")):
                continue
            if (field, value) in ALLOWED:
                if message is not None:
                    problems.append(f"{field}={value!r} is allowed ({ALLOWED[field, value]}) but refused: {message}")
            elif message is None:
                problems.append(f"{field}={value!r} passed validation")
            elif not message.startswith(f"{field}=") or "\n" in message:
                problems.append(f"{field}={value!r}: the message does not name the field on one line: {message}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("train.max_grad_norm", 0.0, "> 0"),
    ("train.adam_beta1", 1.0, "[0, 1)"),
    ("train.adam_beta2", 2.0, "[0, 1)"),
    ("train.ema_decay", 1.0, "(0, 1)"),
    ("eval.guidance_scale", -1.0, ">= 0 (0: sample.guidance_scale)"),
    ("train.adam_epsilon", 0.0, "> 0"),
    ("train.learning_rate", 0.0, "> 0"),
    ("train.clip_range", 0.0, "> 0"),
    ("train.adv_clip_max", 0.0, "> 0"),
    ("sample.eta", 0.0, "nothing trains"),
    ("reward.remote_timeout", 0.0, "> 0"),
    ("reward.jpeg_quality", 0, "1..100"),
    ("reward.jpeg_quality", 101, "1..100"),
    ("prompt_random_choose", 2, "round-robin"),
    ("seed", 2**32, "2**32 - 10000"),
    ("split_step", 1.5, "0 (use the curriculum)"),
    ("sample.batch_size", True, "positive integer"),
    ("train.learning_rate", "1e-4", "finite number"),
])  # fmt: skip
def test_range_ends_and_wrong_types_are_refused(field, value, allowed):
    message = refusal(with_value(get_config("tiny"), field, value))
    assert message is not None and message.startswith(f"{field}=") and allowed in message, message


@pytest.mark.parametrize("field", FLAGS)
@pytest.mark.parametrize("value", [1, "True"])
def test_flags_must_be_bool(field, value):
    message = refusal(with_value(get_config("tiny"), field, value))
    assert message is not None and message.startswith(f"{field}=") and "True or False" in message, message


@pytest.mark.parametrize("field", [field for field, _ in CHOICES] + ["reward.dtype", "train.objective"])
def test_enumerations_are_checked(field):
    message = refusal(with_value(get_config("tiny"), field, "nope"))
    assert message is not None and message.startswith(f"{field}='nope'") and "one of" in message, message


def test_reward_dtype_accepts_the_rewards_aliases():
    for name in ("float32", "bfloat16", "FP16", "half"):
        assert refusal(with_value(get_config("tiny"), "reward.dtype", name)) is None, name


def test_both_advantage_weights_zero_is_refused():
    config = with_value(with_value(get_config("tiny"), "train.beta1", 0.0), "train.beta2", 0.0)
    assert "nothing trains" in refusal(config)


@pytest.mark.parametrize("name", ["", " ", ".", "..", "../x", "../../x", "a/b", "/abs", "a\\b", "a\0b"])
def test_exp_name_must_be_a_plain_name(name):
    message = refusal(with_value(get_config("tiny"), "exp_name", name))
    assert message is not None and message.startswith("exp_name=") and "plain folder name" in message, message


def test_plain_names_and_save_path():
    assert refusal(with_value(get_config("tiny"), "exp_name", "run-1.v2_a")) is None
    assert refusal(with_value(get_config("tiny"), "save_path", "")).startswith("save_path=''")


def write(path: Path, prompts: list[str]) -> str:
    path.write_text(json.dumps(prompts))
    return str(path)


def test_training_prompt_outside_the_grammar_names_the_file_and_the_prompt(tmp_path):
    path = write(tmp_path / "train.json", ["a red circle", "a purple blob"])
    message = refusal(with_value(get_config("tiny"), "prompt_file", path))  # reward.fn shapes_partial
    assert message.startswith(f"prompt_file={path!r}") and "'a purple blob'" in message
    assert "'a COLOUR SHAPE'" in message and "\n" not in message


def test_single_prompt_outside_the_grammar(tmp_path):
    message = refusal(with_value(get_config("testbed"), "prompt", "a dog"))  # reward.fn shapes_partial
    assert message.startswith("prompt='a dog'") and "shapes-world grammar" in message


def test_held_out_prompts_are_parsed_when_the_verifier_reads_them(tmp_path):
    config = with_value(get_config("tiny_sd"), "eval.prompt_file", write(tmp_path / "test.json", ["a blue cat"]))
    assert refusal(config) is None  # brightness reward, no verifier: any prompt
    message = refusal(with_value(config, "eval.verifier", True))
    assert message.startswith("eval.prompt_file=") and "'a blue cat'" in message and "eval.verifier" in message
    assert refusal(with_value(with_value(config, "eval.verifier", True), "eval.every", 0)) is None  # no eval


def test_validate_does_not_import_the_testbed():
    code = "import sys, srrl.validate; print('shapes.world' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
