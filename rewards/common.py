"""Helpers shared by the reward modules: types, option parsing and one-line load errors.

Nothing here imports transformers or any optional reward package, so ``import rewards.rewards`` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

from srrl.errors import ConfigError, LoadError

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
RewardFactory = Callable[[torch.device, Mapping[str, Any]], RewardFn]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# The optional extras of pyproject.toml: reward name -> (import name, extra, pip package).
EXTRAS = {
    "image_reward": ("ImageReward", "image-reward", "image-reward"),
    "vqa_score": ("t2v_metrics", "vqa-score", "t2v-metrics"),
    "hpsv2": ("hpsv2", "hpsv2", "hpsv2"),
}


def option_dtype(options: Mapping[str, Any], reward: str) -> torch.dtype:
    """The reward model dtype from ``options.dtype`` (default float32); a one-line error if unknown."""
    name = str(options.get("dtype", "float32")).lower()
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}' for {reward}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def option_batch_size(options: Mapping[str, Any], reward: str) -> int:
    """Images per reward-model call from ``options.batch_size`` (default 16); must be >= 1."""
    batch_size = int(options.get("batch_size", 16))
    if batch_size < 1:
        raise ConfigError(f"{reward} batch_size must be >= 1, got {batch_size}")
    return batch_size


def env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now (huggingface_hub reads it only at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def local_files_only(options: Mapping[str, Any]) -> bool:
    """``options.local_files_only`` or the offline environment variables."""
    return bool(options.get("local_files_only", False)) or env_offline()


def looks_like_path(model_id: str) -> bool:
    """Whether ``model_id`` is meant as a local path rather than a hub id ``namespace/name``."""
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
        or os.path.exists(model_id)
    )


def first_line(cause: BaseException | None) -> str:
    """`` (ErrorType: first line of the message)`` of ``cause``, or an empty string."""
    if cause is None:
        return ""
    text = (str(cause).strip().splitlines() or [""])[0][:200]
    return f" ({type(cause).__name__}: {text})"


def load_error(
    reward: str, what: str, source: str, field: str, cause: BaseException | None, default: str = ""
) -> LoadError:
    """The one-line error raised when the model/weights ``source`` of ``reward`` cannot be loaded.

    ``field`` is the ``config.reward`` field that names the source; ``default`` is the hub id to suggest
    downloading when ``source`` is a local path.
    """
    if looks_like_path(source) and default:
        example = f"`hf download {default} --local-dir {source}`"
    elif looks_like_path(source):
        example = f"copying the files to {source}"
    else:
        example = f"`hf download {source}`"
    return LoadError(
        f"could not load {what} '{source}' for reward '{reward}'{first_line(cause)}; provide it by downloading "
        f"it with network access (e.g. {example}) or by setting config.reward.{field} "
        "to a local directory containing the model"
    )


def import_extra(reward: str, module: str | None = None) -> ModuleType:
    """Import the optional package of ``reward`` (see :data:`EXTRAS`); a one-line error says what to install."""
    package, extra, pip_name = EXTRAS[reward]
    name = module or package
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise LoadError(
            f"reward '{reward}' needs the optional package '{package}', which is not importable{first_line(err)}; "
            f"install it with `pip install .[{extra}]` (or `pip install {pip_name}`)"
        ) from None


HUB_PREFIX = "hf://"


def weights_file(source: str, reward: str, what: str, field: str, local_only: bool) -> str:
    """Local path of a weights file given as a path or as ``hf://<owner>/<repo>/<filename>`` (downloaded once).

    A missing file or a failed download raises a one-line ``LoadError`` naming ``config.reward.<field>``.
    """
    if source.startswith(HUB_PREFIX):
        parts = source[len(HUB_PREFIX) :].split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"config.reward.{field}={source!r}: expected hf://<owner>/<repo>/<filename> or a path")
        repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo_id, filename, local_files_only=local_only)
        except Exception as err:  # hub errors have many types (HTTP, offline, missing entry)
            cause: BaseException | None = err
        hint = f"`hf download {repo_id} {filename} --local-dir DIR`"
    else:
        path = os.path.expanduser(source)
        if os.path.isfile(path):
            return path
        cause = FileNotFoundError(f"no such file: {path}")
        hint = "the file from its published location"
    raise LoadError(
        f"could not load {what} '{source}' for reward '{reward}'{first_line(cause)}; download it with network "
        f"access (e.g. {hint}) and set config.reward.{field} to the local file"
    )


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch checkpoint (tensors only, loaded on CPU)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def parse_option_pairs(pairs: list[str]) -> dict[str, Any]:
    """``{KEY: VALUE}`` of ``KEY=VALUE`` strings; VALUE is parsed as JSON when it parses, else kept as text."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"reward option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
