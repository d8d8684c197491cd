"""The run directory contract: atomic JSON/JSONL/safetensors writes, checkpoints and resume.

Layout of ``<save_path>/<exp_name>/``: ``config.json``, ``metrics.jsonl``, ``eval.jsonl``, ``history.json``,
``curves.png``, ``images/stage_NNN.png`` and ``checkpoints/stage_NNN/`` (LoRA weights + ``state.json`` +
``optimizer.safetensors``). A checkpoint directory appears by an atomic rename, so it is complete or absent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from srrl.errors import LoadError
from srrl.faults import failpoint

logger = logging.getLogger(__name__)

TMP_PREFIXES = (".tmp_",)  # atomic_dir's temporary directories
TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path: str, mode: int) -> None:
    """Give ``path`` the permissions an ordinary ``open``/``mkdir`` would (``mode`` less the umask): mkstemp and
    mkdtemp create 0600 / 0700, which hides results from the group on a shared cluster."""
    os.chmod(path, mode & ~_umask())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (umask permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        _as_umask_allows(tmp, 0o666)
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def strict(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None, so that it is strict JSON (no NaN / Infinity)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict(v) for v in data]
    return data


def dumps(data: Any, **kwargs) -> str:
    """Strict JSON of ``data`` (non-finite floats as null)."""
    return json.dumps(strict(data), allow_nan=False, sort_keys=True, **kwargs)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(dumps(data, indent=1) + "\n"))


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(dumps(r) + "\n" for r in records)))


def read_json(path: Path, what: str) -> Any:
    """The JSON of ``path``; a missing, unreadable or malformed file is a one-line LoadError naming ``what``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoadError(f"{what} {path} is not valid JSON ({err}); it may be truncated") from None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file written by :func:`write_jsonl`. A partial last line (a write cut off by a kill
    or a full disk) is dropped with a warning; a bad line before the last is a LoadError."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if k == len(lines) - 1:
                logger.warning("%s: dropped a partial last line (%s)", path, str(err)[:80])
                break
            raise LoadError(f"{path}: line {k + 1} is not a JSON record ({str(err)[:80]}); repair or remove it") from None
        records.append(record)
    return records


def checkpoint_name(stage: int) -> str:
    return f"stage_{stage:03d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("stage_") and (p / "state.json").is_file())


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create the directory ``final`` atomically: ``fill(tmp_dir)`` writes its files, then a rename publishes it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=TMP_PREFIXES[0]))
    try:
        _as_umask_allows(str(tmp), 0o777)
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def write_checkpoint(run_dir: Path, stage: int, fill: Callable[[Path], None], keep: int) -> Path:
    """Create ``checkpoints/stage_NNN`` atomically (see :func:`atomic_dir`); delete all but the newest ``keep``."""
    final = atomic_dir(run_dir / "checkpoints" / checkpoint_name(stage), fill)
    failpoint("checkpoint_published", stage)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed runs leave behind: ``checkpoints/.tmp_*`` directories and ``.*.tmp`` files in the run
    directory and its ``images/`` and ``checkpoints/``; returns them. Only safe while this process owns the run
    directory (:class:`RunLock`)."""
    stale = []
    for folder in (run_dir, run_dir / "images", run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIXES) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                stale.append(entry)
            elif entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
                entry.unlink(missing_ok=True)
                stale.append(entry)
    return stale


def tensors_to_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into safetensors-able tensors and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def load_tensors(path: Path, what: str = "tensor file", required: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (``{}`` when it is absent, unless ``required``); a missing
    required file or an unreadable one (truncated, foreign) is a one-line LoadError naming ``what``."""
    if not path.is_file():
        if required:
            raise LoadError(f"{what} {path} not found")
        return {}
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise LoadError(f"{what} {path} is unreadable ({str(err).splitlines()[0][:120]}): truncated or not a "
                        "safetensors file") from None
