"""Evaluate a base model and its SRRL checkpoints on held-out prompts with fixed seeds.

    python evaluate.py --run_dir logs/srrl_sd14 --rewards clip_score,aesthetic --out logs/srrl_sd14/eval
    python evaluate.py --config config/stage_process.py:tiny --checkpoints a/stage_004,b/stage_009

Every checkpoint sees the same prompts and the same noise (per image, from ``eval.seed``, exactly as the
trainer's held-out evaluation), denoised with the config's ``eval.eta`` (0, deterministic DDIM, unless the config
says otherwise; the ``tiny`` and ``testbed`` presets use 1) by a UNet in ``eval.dtype`` (the ``tiny`` preset: bfloat16).
Writes ``<out>/images/<name>/<i>.png`` (image ``i`` is
prompt ``i // n``, repeat ``i % n``), ``<out>/metrics.json`` (mean, std, stderr, n per checkpoint and reward, plus
per-prompt means), ``<out>/grid.png`` (rows prompts, columns checkpoints) and ``<out>/index.html``. With
``eval.verifier`` (shapes-world prompts) ``metrics.json`` also holds the exact verifier's accuracy per column
(``verifier``), each image's strict outcome (``verifier_strict``) and, for every checkpoint, its paired change of
strict accuracy against the base model (``strict_change``: the images are the same, so its standard error comes
from the images whose outcome changed). Scores are computed from the saved 8-bit PNGs. Re-running skips images
already on disk (the model is not even loaded when none is missing) and refuses an ``--out`` folder whose images
were made with other generation settings.

With ``--run_dir``, the run's own ``config.json`` is the base config (so the base model, resolution and LoRA rank
match its checkpoints); ``--config`` and its overrides apply only without a run directory or with
``--from_run_config=false``. The flags below override single settings either way.
"""

from __future__ import annotations

import html
import logging
import math
import sys
from pathlib import Path

import ml_collections
import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags
from PIL import Image
from tqdm.auto import tqdm

from cli import evalargs
from cli.entry import FAMILIES, parse_flags
from rewards.rewards import build_reward
from srrl.distributed import WEIGHT_DTYPES
from srrl.heldout import describe_strict_change, eval_dtype, strict_gain
from srrl.models import inference_denoiser, load_lora, read_lora
from srrl.plots import image_grid, save_png
from srrl.rundir import atomic_write, read_json, write_json
from srrl.sampling import GuidedDenoiser
from srrl.stage import generate_eval_images, heldout_guidance_scale
from srrl.validate import ConfigError, LoadError, load_prompt_entries, prompt_metadata
from testbed.verifier import check_table, family_summary, table_reward

logger = logging.getLogger("srrl.evaluate")

# Settings that determine the pixels of an image: a resumed --out folder must agree on all of them.
_GENERATION_KEYS = ("model", "revision", "resolution", "num_steps", "guidance_scale", "seed", "prompts",
                    "num_images_per_prompt", "lora_rank", "lora_target_modules", "mixed_precision", "eta", "dtype")


def resolve_config(base: ml_collections.ConfigDict, run_dir: str, from_run_config: bool) -> ml_collections.ConfigDict:
    """``base``, or with ``from_run_config`` the run's ``config.json`` (:func:`cli.evalargs.read_run_config`)."""
    if not run_dir or not from_run_config:
        return base
    config = evalargs.read_run_config(run_dir)
    logger.info("using the run's config %s", Path(run_dir) / "config.json")
    return config


def select_checkpoints(run_dir: str, stages: str, extra: list[str], include_base: bool) -> dict[str, Path | None]:
    """Column name -> checkpoint folder (None for the base model), in column order; ``stages`` as
    :func:`cli.evalargs.stage_checkpoints` (a stage the run has no checkpoint for is refused)."""
    chosen: dict[str, Path | None] = {"base": None} if include_base else {}
    found = evalargs.stage_checkpoints(run_dir, stages)
    for k, path in enumerate([*found, *(Path(p) for p in extra)]):
        evalargs.check_lora_file(path)
        name = path.name
        if k >= len(found) and path.parent.name == "checkpoints":  # <run>/checkpoints/stage_NNN -> <run>_stage_NNN
            name = f"{path.parent.parent.name}_{path.name}"
        while name in chosen:
            name += "_"
        chosen[name] = path
    if not chosen:
        raise ConfigError("nothing to evaluate: give --run_dir with checkpoints, --checkpoints, or --include_base")
    return chosen


def set_lora(denoiser: torch.nn.Module, checkpoint: Path | None) -> None:
    """Load a checkpoint's LoRA weights into ``denoiser``, or zero them all (the base model) when None."""
    if checkpoint is not None:
        load_lora(denoiser, checkpoint)
        return
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.zero_()


def generate_rows(model, denoiser: GuidedDenoiser, config, prompts: list[str], rows: list[int], device) -> torch.Tensor:
    """Images ``[len(rows), 3, H, W]`` of ``prompts`` for the global image indices ``rows``.

    ``srrl.stage.generate_eval_images`` keys the noise of image ``i`` by ``(eval.seed, i)`` whatever the
    batching, so these are the trainer's held-out images; autocast as in training for fp16/bf16 on CUDA.
    """
    autocast = device.type == "cuda" and model.weight_dtype != torch.float32
    with torch.autocast(device.type, dtype=model.weight_dtype, enabled=autocast):
        return generate_eval_images(model, denoiser, config, prompts, rows, device)


def load_images(paths: list[Path]) -> torch.Tensor:
    """``[N, 3, H, W]`` float32 in ``[0, 1]`` from PNG files."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def summarise(scores: torch.Tensor) -> dict[str, float | int]:
    """mean, std (unbiased; 0 for one value), stderr and n of ``scores``."""
    n = scores.numel()
    std = scores.std().item() if n > 1 else 0.0
    return {"mean": scores.mean().item(), "std": std, "stderr": std / math.sqrt(n), "n": n}


def verifier_metrics(rows: list[str], tables: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``verifier`` (accuracy per caption family and part), ``verifier_strict`` (each image's strict outcome) per
    column of ``tables`` (:func:`check_table` of the images of ``rows``), and ``strict_change`` of every column
    against column ``base`` when there is one (paired: the same images)."""
    out: dict[str, dict] = {"verifier": {}, "verifier_strict": {}, "strict_change": {}}
    for name, table in tables.items():
        out["verifier"][name] = family_summary(rows, table)
        out["verifier_strict"][name] = table[:, 0].int().tolist()
    checkpoints = [name for name in tables if name != "base"] if "base" in tables else []
    for name in checkpoints:
        gain = strict_gain(column_record(out, "base"), column_record(out, name))
        out["strict_change"][name] = {"delta": gain.delta, "stderr": gain.stderr, "in_se": gain.in_se,
                                      "gained": gain.gained, "lost": gain.lost}
    return out


def column_record(metrics: dict, column: str) -> dict:
    """The verifier part of ``column`` in the shape of a trainer evaluation record (for ``strict_gain``)."""
    return {"verifier": metrics["verifier"][column], "verifier_strict": metrics["verifier_strict"][column]}


_STYLE = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
          "padding:4px;vertical-align:top;text-align:center}td.p{text-align:left;max-width:18em}img{width:192px;"
          "image-rendering:pixelated}.best{font-weight:bold;color:#060}")


def best_columns(values: dict[str, float | None]) -> set[str]:
    """The columns holding the highest finite value, shown as a row's winners: all of them on a tie for the
    best, none when every column ties (nothing won) or no value is finite."""
    finite = {c: v for c, v in values.items() if v is not None and math.isfinite(v)}
    top = max(finite.values(), default=None)
    best = {c for c, v in finite.items() if v == top}
    return best if len(best) < len(values) else set()


def write_index(path: Path, metrics: dict, n: int) -> None:
    """``index.html``: the summary table, then every image of every checkpoint side by side with its scores."""
    columns, rewards, scores = list(metrics["metrics"]), metrics["rewards"], metrics["scores"]
    e = html.escape
    head = "".join(f"<th>{e(r)}<br>mean ± stderr (n)</th>" for r in rewards)
    summary = "".join(
        f"<tr><th>{e(c)}</th>" + "".join(
            f"<td>{m['mean']:.4f} ± {m['stderr']:.4f} ({m['n']})</td>" for m in metrics["metrics"][c].values()
        ) + "</tr>" for c in columns)
    rows = []
    for i in range(len(metrics["prompts"]) * n):
        best = best_columns({c: scores[c][rewards[0]][i] for c in columns})
        cells = []
        for c in columns:
            values = "<br>".join(f"{e(r)} {scores[c][r][i]:.4f}" for r in rewards)
            css = ' class="best"' if c in best else ""
            cells.append(f'<td><img src="images/{e(c)}/{i}.png" alt="{e(c)} {i}"><div{css}>{values}</div></td>')
        prompt = e(metrics["prompts"][i // n]) + (f" <small>#{i % n}</small>" if n > 1 else "")
        rows.append(f'<tr><td class="p">{prompt}</td>{"".join(cells)}</tr>')
    settings = ", ".join(f"{k} {e(str(metrics[k]))}" for k in ("model", "num_steps", "guidance_scale", "seed"))
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>SRRL evaluation</title><style>{_STYLE}</style>"
            f"</head><body><h1>SRRL evaluation</h1><p>{settings}; {n} image(s) per prompt; the best "
            "column(s) of the first reward in bold (none where all columns tie).</p>"
            f"<table><tr><th>checkpoint</th>{head}</tr>{summary}</table><h2>Images</h2>"
            f"<table><tr><th>prompt</th>{''.join(f'<th>{e(c)}</th>' for c in columns)}</tr>{''.join(rows)}</table>"
            "</body></html>\n")
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


class Evaluation:
    """Generates (resumably), scores and reports one evaluation folder."""

    def __init__(self, config: ml_collections.ConfigDict, family: str, checkpoints: dict[str, Path | None],
                 prompts: list[str], reward_names: list[str], out: Path, device: torch.device, batch_size: int,
                 num_images_per_prompt: int, metadata: dict[str, dict] | None = None) -> None:
        self.config, self.family, self.checkpoints, self.metadata = config, family, checkpoints, metadata or {}
        self.prompts, self.reward_names, self.out = prompts, reward_names, out
        self.device, self.batch_size, self.n = device, batch_size, num_images_per_prompt
        self.rows = [p for p in prompts for _ in range(num_images_per_prompt)]
        self._model = None

    def settings(self) -> dict:
        """What determines the images (compared on resume) plus the checkpoint sources."""
        c = self.config
        return {"model": c.pretrained.model, "revision": c.pretrained.revision, "resolution": c.sample.resolution,
                "num_steps": c.sample.num_steps, "guidance_scale": heldout_guidance_scale(c), "seed": c.eval.seed,
                "eta": c.eval.eta, "dtype": c.eval.dtype,
                "prompts": self.prompts, "num_images_per_prompt": self.n, "lora_rank": c.lora_rank,
                "lora_target_modules": c.lora_target_modules,
                "mixed_precision": c.mixed_precision, "family": self.family,
                "checkpoints": {k: str(v) if v else None for k, v in self.checkpoints.items()}}

    def check_resume(self) -> None:
        """Refuse an output folder whose images were generated with other settings; then record ours."""
        path = self.out / "settings.json"
        new = self.settings()
        if path.is_file():
            old = read_json(path, "evaluation settings")
            for key in _GENERATION_KEYS:
                if key in old and old[key] != new[key]:  # (folders made before a key existed lack it)
                    raise ConfigError(f"--out {str(self.out)!r} holds images made with another {key} "
                                      f"({str(old.get(key))[:60]} != {str(new[key])[:60]}); use a new --out")
            for name, source in old.get("checkpoints", {}).items():
                if name in new["checkpoints"] and new["checkpoints"][name] != source:
                    raise ConfigError(f"--out {str(self.out)!r}: column {name!r} was {source}, now "
                                      f"{new['checkpoints'][name]}; use a new --out")
            new["checkpoints"] = {**old.get("checkpoints", {}), **new["checkpoints"]}
        write_json(path, new)

    def model(self):
        """The policy, loaded on first use (a fully resumed evaluation never loads it)."""
        if self._model is None:
            dtype = WEIGHT_DTYPES[self.config.mixed_precision]
            if self.device.type == "cpu" and dtype == torch.float16:
                logger.warning("fp16 on CPU is unsupported; generating in float32")
                dtype = torch.float32
            self._model = FAMILIES[self.family](self.config, self.device, dtype)
            self._model.denoiser.eval()
        return self._model

    def image_paths(self, name: str) -> list[Path]:
        return [self.out / "images" / name / f"{i}.png" for i in range(len(self.rows))]

    def missing(self, name: str) -> list[int]:
        """The indices of the images of column ``name`` not yet on disk."""
        return [i for i, p in enumerate(self.image_paths(name)) if not p.is_file()]

    def check_checkpoints(self) -> None:
        """Read every checkpoint whose column still lacks images against the policy's UNet before any image is
        generated: a truncated, foreign or non-finite LoRA file stops the evaluation at once (LoadError)."""
        for name, checkpoint in self.checkpoints.items():
            if checkpoint is not None and self.missing(name):
                read_lora(self.model().denoiser, checkpoint)

    def build_rewards(self) -> dict:
        """The reward functions by name; the plain ValueErrors of ``rewards`` (an unknown name, a bad option)
        become ConfigErrors."""
        try:
            return {name: build_reward(name, self.device, self.config.reward, self.metadata)
                    for name in self.reward_names}
        except ValueError as err:
            raise ConfigError(f"--rewards={','.join(self.reward_names)}: {err}") from None

    def generate(self, name: str, checkpoint: Path | None) -> int:
        """Write the missing images of one column; returns how many were generated."""
        missing = self.missing(name)
        if not missing:
            logger.info("%s: all %d images on disk; skipping generation", name, len(self.rows))
            return 0
        model = self.model()
        set_lora(model.denoiser, checkpoint)
        bar = tqdm(total=len(missing), desc=f"generate {name}", unit="img")
        merge, dtype = self.config.sample.merge_lora, eval_dtype(self.config, self.device)
        with inference_denoiser(model.denoiser, merge, dtype) as network:  # as the trainer's evaluation
            denoiser = GuidedDenoiser(network, self.config.sample.max_micro_batch, model.embedded_guidance)
            for start in range(0, len(missing), self.batch_size):
                rows = missing[start : start + self.batch_size]
                images = generate_rows(model, denoiser, self.config, [self.rows[i] for i in rows], rows, self.device)
                pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                for i, array in zip(rows, pixels, strict=True):
                    save_png(Image.fromarray(array), self.out / "images" / name / f"{i}.png")
                bar.update(len(rows))
        bar.close()
        return len(missing)

    def score(self, rewards: dict) -> tuple[dict[str, dict[str, list[float]]], dict[str, torch.Tensor]]:
        """Per column and reward, the score of every image, and with ``eval.verifier`` per column the exact
        verifier's :func:`check_table` [N, parts] (empty otherwise); each PNG is read back once for both."""
        scores: dict[str, dict[str, list[float]]] = {}
        tables: dict[str, torch.Tensor] = {}
        verifier = self.config.eval.verifier
        chunk = max(1, int(self.config.reward.batch_size))
        for name in tqdm(self.checkpoints, desc="score", unit="ckpt"):
            paths = self.image_paths(name)
            scores[name] = {r: [] for r in rewards}
            parts = []
            for start in range(0, len(paths), chunk):
                images, captions = load_images(paths[start : start + chunk]), self.rows[start : start + chunk]
                on_device = images.to(self.device)
                table = check_table(captions, images) if verifier else None
                for reward, fn in rewards.items():
                    value = table_reward(reward, table) if table is not None else None  # the verifier runs once
                    value = fn(on_device, captions).float().cpu() if value is None else value
                    scores[name][reward] += value.tolist()
                if table is not None:
                    parts.append(table)
            if verifier:
                tables[name] = torch.cat(parts)
        return scores, tables

    def run(self) -> dict:
        """Generate what is missing, score everything, write metrics.json, grid.png and index.html."""
        rewards = self.build_rewards()
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_resume()
        self.check_checkpoints()
        generated = {name: self.generate(name, ckpt) for name, ckpt in self.checkpoints.items()}
        scores, tables = self.score(rewards)
        metrics = {
            "metrics": {c: {r: summarise(torch.tensor(v)) for r, v in s.items()} for c, s in scores.items()},
            "per_prompt": {c: {r: torch.tensor(v).reshape(len(self.prompts), self.n).mean(1).tolist()
                               for r, v in s.items()} for c, s in scores.items()},
            "scores": scores, "generated": generated, "rewards": self.reward_names, **self.settings(),
        }
        if tables:
            metrics.update(verifier_metrics(self.rows, tables))
        write_json(self.out / "metrics.json", metrics)
        self.write_grid(scores)
        write_index(self.out / "index.html", metrics, self.n)
        for name, per_reward in metrics["metrics"].items():
            logger.info("%s: %s", name, ", ".join(f"{r} {m['mean']:.4f} ± {m['stderr']:.4f}" for r, m in per_reward.items()))
        for name in metrics.get("strict_change", {}):
            logger.info("%s", describe_strict_change(column_record(metrics, "base"), column_record(metrics, name),
                                                     f"of {name}", "base model"))
        return metrics

    def write_grid(self, scores: dict[str, dict[str, list[float]]]) -> None:
        """``grid.png``: the first image of each prompt (rows) for each checkpoint (columns)."""
        first = self.reward_names[0]
        images, labels = [], []
        for j, prompt in enumerate(self.prompts):
            for name in self.checkpoints:
                images.append(self.image_paths(name)[j * self.n])
                head = f"{name[:11]} {scores[name][first][j * self.n]:.3g}"
                labels.append(head.ljust(22)[:22] + prompt)
        grid = image_grid(load_images(images), labels, columns=len(self.checkpoints), max_rows=len(self.prompts))
        save_png(grid, self.out / "grid.png")


def define_flags() -> None:
    """Define the command-line flags (only when run as a script, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", "config/stage_process.py:sd14", "Base config (see above).")
    flags.DEFINE_string("run_dir", "", "A run directory: evaluates its checkpoints/stage_NNN (see --stages).")
    flags.DEFINE_list("checkpoints", [], "Extra checkpoint folders holding pytorch_lora_weights.safetensors.")
    flags.DEFINE_string("stages", "all", "Checkpoints of --run_dir: 'all', 'last' or stage numbers, e.g. '0,4,9'.")
    flags.DEFINE_bool("include_base", True, "Also evaluate the base model (LoRA weights zeroed), as column 'base'.")
    flags.DEFINE_bool("from_run_config", True, "Use <run_dir>/config.json as the base config.")
    flags.DEFINE_string("family", "", "Model family, a key of cli.entry.FAMILIES (default: the config's family).")
    flags.DEFINE_string("model", "", "Override pretrained.model (hub id or local pipeline folder).")
    flags.DEFINE_string("prompt_file", "", "JSON list of prompts (default: eval.prompt_file of the config).")
    flags.DEFINE_list("rewards", [], "Rewards to score with (default: reward.fn of the config).")
    flags.DEFINE_multi_string("reward_option", [], "KEY=VALUE: set config.reward.KEY (repeatable; JSON values).")
    flags.DEFINE_integer("num_images_per_prompt", None,
                         "Images per prompt, >= 1 (default: eval.num_images_per_prompt).")
    flags.DEFINE_integer("seed", None, "Seed of the initial noise, >= 0 (default: eval.seed).")
    flags.DEFINE_integer("num_steps", None, "DDIM steps, >= 1 (default: sample.num_steps).")
    flags.DEFINE_float("guidance_scale", None, "CFG scale, >= 0 (default: eval.guidance_scale, else sample's).")
    flags.DEFINE_integer("batch_size", 16, "Images per generation call, >= 1.")
    flags.DEFINE_string("out", "", "Output folder (default: <run_dir>/eval, or ./eval_out without a run).")
    flags.DEFINE_string("device", "", "Device (default: cuda if available, else cpu).")


def main(argv: list[str]) -> None:
    """Resolve the config and the checkpoints from the flags, then run the evaluation."""
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    f = flags.FLAGS
    values = {"eval.seed": f.seed, "sample.num_steps": f.num_steps, "sample.guidance_scale": f.guidance_scale,
              "eval.num_images_per_prompt": f.num_images_per_prompt}
    try:
        evalargs.check_flags({"batch_size": f.batch_size, **{k.split(".")[1]: v for k, v in values.items()}})
        device = evalargs.resolve_device(f.device)
        config = resolve_config(f.config, f.run_dir, f.from_run_config)
        family = f.family or config.family  # upgraded: runs made before the field were SD
        if family not in FAMILIES:
            raise ConfigError(f"--family={family!r} is not allowed; expected one of {', '.join(FAMILIES)}")
        evalargs.apply_flags(config, {"pretrained.model": f.model or None, **values}, f.reward_option)
        entries = load_prompt_entries(f.prompt_file or config.eval.prompt_file, "prompt_file")
        prompts = [e["prompt"] for e in entries]
        checkpoints = select_checkpoints(f.run_dir, f.stages, f.checkpoints, f.include_base)
        out = Path(f.out or (Path(f.run_dir) / "eval" if f.run_dir else "eval_out"))
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out={str(out)!r} is a file; expected a folder (new or of an evaluation)")
        Evaluation(config, family, checkpoints, prompts, f.rewards or [config.reward.fn], out, device,
                   f.batch_size, config.eval.num_images_per_prompt, prompt_metadata(entries)).run()
    except (ConfigError, LoadError) as err:  # a user's mistake or an unloadable file: one line, exit code 2
        logger.error("%s", " ".join(str(err).splitlines()))
        sys.exit(2)
    logger.info("wrote %s", out / "index.html")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
