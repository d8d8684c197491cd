"""The testbed study: DDPO, GRPO, B2-DiffuRL and SRRL (each with any training objective) x seeds on the shapes
world, scored by the exact verifier.

    python -m testbed.study --preset testbed
    python -m testbed.study --preset testbed --algorithms srrl,b2diffurl,ddpo,grpo,grpo:ppo,grpo:nft+train.beta2=1

runs ``train.py --config config/stage_process.py:PRESET`` once per (arm, seed); an arm is an algorithm with the
preset's objective, or ``ALGORITHM:OBJECTIVE`` (``train.objective``), either followed by ``+FIELD=VALUE``
overrides of that arm alone, ``--jobs`` runs at a
time (each with ``cpu_count // jobs`` torch threads), under ``--runs`` (a finished run is reused, an
unfinished one resumed). It then reads every run's held-out evaluations (``eval.jsonl``: the verifier's
accuracy per caption family on the preset's held-out captions, before and after training) and writes
``study.md`` (tables: mean ± standard error over seeds), ``study.json`` and ``study.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from srrl.algorithms import ALGORITHMS
from srrl.heldout import strict_gain
from srrl.objectives import OBJECTIVES
from srrl.rundir import atomic_write, read_jsonl, write_json

logger = logging.getLogger("testbed.study")
ROOT = Path(__file__).resolve().parents[1]
FAMILY_COLUMNS = ("single", "count", "relation", "all")
PART_COLUMNS = ("colour", "shape", "count", "relation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="testbed", help="config preset of config/stage_process.py")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated arms: ALGORITHM (the preset's objective) or ALGORITHM:OBJECTIVE")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seed indices (config.seed = 1000 * k)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--runs", default="logs/study", help="parent folder of the run directories")
    p.add_argument("--out", default="docs", help="where study.md, study.json and study.png go")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra config override for every run (repeatable), e.g. --set curriculum.total_stages=5")
    args = p.parse_args(argv)
    algorithms = args.algorithms.split(",")
    heads = [a.split("+")[0] for a in algorithms]
    unknown = [a for a in heads if a.partition(":")[0] not in ALGORITHMS
               or (":" in a and a.partition(":")[2] not in OBJECTIVES)]
    unknown += [a for a in algorithms if any("=" not in kv for kv in a.split("+")[1:])]
    if unknown or len(set(algorithms)) != len(algorithms):
        p.error(f"--algorithms={args.algorithms!r}: expected distinct arms ALGORITHM or ALGORITHM:OBJECTIVE, each "
                f"optionally followed by +FIELD=VALUE, with ALGORITHM from {', '.join(ALGORITHMS)} and OBJECTIVE "
                f"from {', '.join(OBJECTIVES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = [-1]
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        p.error(f"--seeds={args.seeds!r}: expected distinct non-negative integers such as 0,1,2")
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs}: expected a positive integer")
    return args


def run_name(preset: str, arm: str, seed: int) -> str:
    return f"{preset}_{arm.replace(':', '-').replace('+', '_').replace('=', '')}_s{seed}"


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a held-out evaluation after its last stage."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        return False
    last = json.loads(config_file.read_text(encoding="utf-8"))["curriculum"]["total_stages"] - 1
    return any(e["after_stage"] == last for e in read_jsonl(run_dir / "eval.jsonl"))


def run_one(args: argparse.Namespace, arm: str, seed: int, threads: int) -> Path:
    """Train one (arm, seed) in a subprocess unless it already finished; returns its run directory."""
    name = run_name(args.preset, arm, seed)
    head, *overrides = arm.split("+")
    algorithm, _, objective = head.partition(":")
    run_dir = Path(args.runs) / name
    if finished(run_dir):
        logger.info("%s: finished earlier, reused", name)
        return run_dir
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'config' / 'stage_process.py'}:{args.preset}",
        f"--config.algorithm={algorithm}", f"--config.seed={1000 * seed}", f"--config.exp_name={name}",
        f"--config.save_path={args.runs}", *(f"--config.{kv}" for kv in args.set),
        *([f"--config.train.objective={objective}"] if objective else []),
        *(f"--config.{kv}" for kv in overrides),
    ]  # fmt: skip
    if (run_dir / "config.json").is_file():
        cmd.append(f"--config.resume_from={run_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(Path(args.runs) / f"{name}.log", "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not finished(run_dir):
        raise RuntimeError(f"run {name} failed (exit {code}); see {Path(args.runs) / f'{name}.log'}")
    logger.info("%s: done in %.0f s", name, time.perf_counter() - start)
    return run_dir


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for one value; NaN, NaN for none)."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0


def learning_curve(run_dir: Path, evals: list[dict], metrics: list[dict]) -> list[dict]:
    """Per held-out evaluation of a run: stages trained, images sampled and UNet rows run by then (None where the
    run's records lack them), strict accuracy and its paired change against the first evaluation (the base)."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    sample = config.get("sample", {})
    per_stage = sample.get("batch_size", 0) * sample.get("num_batches_per_epoch", 0) * config.get("split_time", 0)
    points = []
    for e in evals:
        done = [m for m in metrics if m["stage"] <= e["after_stage"]]
        rows = [m.get("unet_rows") for m in done]
        gain = strict_gain(evals[0], e)
        points.append({"stage": e["after_stage"] + 1, "images": per_stage * len(done) if per_stage else None,
                       "unet_rows": sum(rows) if all(r is not None for r in rows) else None,
                       "strict": e["verifier"]["all"]["strict"], "change": gain.delta, "change_se": gain.stderr})
    return points


def collect(runs: dict[tuple[str, int], Path]) -> dict:
    """Per algorithm: base and final verifier results of every seed, and their mean ± stderr over seeds."""
    out: dict = {"runs": {}, "summary": {}}
    for (algorithm, seed), run_dir in runs.items():
        evals = read_jsonl(run_dir / "eval.jsonl")
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        out["runs"][f"{algorithm}/{seed}"] = {
            "run_dir": str(run_dir), "base": evals[0]["verifier"], "final": evals[-1]["verifier"],
            "curve": [(e["after_stage"], e["verifier"]["all"]["strict"]) for e in evals],
            "points": learning_curve(run_dir, evals, metrics),
            "train_s": sum(m["time_stage_s"] for m in metrics),
        }  # fmt: skip
    algorithms = list(dict.fromkeys(a for a, _ in runs))
    first = next(iter(out["runs"].values()))
    rows = {"base model": [first["base"]]} | {
        a: [r["final"] for k, r in out["runs"].items() if k.split("/")[0] == a] for a in algorithms
    }
    for label, results in rows.items():
        entry = {}
        for family in FAMILY_COLUMNS:
            entry[family] = mean_stderr([r[family]["strict"] for r in results if family in r])
        for part in PART_COLUMNS:
            entry[f"part:{part}"] = mean_stderr([r["all"][part] for r in results if part in r["all"]])
        entry["seeds"] = len(results)
        entry["train_min"] = float(
            np.mean([r["train_s"] for k, r in out["runs"].items() if k.split("/")[0] == label] or [0.0]) / 60
        )
        out["summary"][label] = entry
    return out


def markdown(results: dict, command: str, n_images: dict[str, float]) -> str:
    """The study tables in Markdown."""
    def cell(value: tuple[float, float]) -> str:
        return "—" if math.isnan(value[0]) else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"

    head = "| | " + " | ".join(f"{f} (n={int(n_images.get(f, 0))})" for f in FAMILY_COLUMNS) + " | seeds | train min/run |"
    lines = [head, "|---" * (len(FAMILY_COLUMNS) + 3) + "|"]
    for label, e in results["summary"].items():
        cells = " | ".join(cell(e[f]) for f in FAMILY_COLUMNS)
        lines.append(f"| {label} | {cells} | {e['seeds']} | {e['train_min']:.1f} |")
    parts = ["| | " + " | ".join(PART_COLUMNS) + " |", "|---" * (len(PART_COLUMNS) + 1) + "|"]
    for label, e in results["summary"].items():
        parts.append(f"| {label} | " + " | ".join(cell(e[f"part:{p}"]) for p in PART_COLUMNS) + " |")
    changes = ["| | per-seed paired change of strict accuracy, all families (points ± s.e.) |", "|---|---|"]
    for label in list(results["summary"])[1:]:
        seeds = [(k.split("/")[1], r["points"][-1]) for k, r in results["runs"].items() if k.split("/")[0] == label]
        changes.append(f"| {label} | " + "; ".join(f"seed {s}: {100 * p['change']:+.1f} ± {100 * p['change_se']:.1f}"
                                                  for s, p in seeds) + " |")
    return (
        f"Command: `{command}`\n\nHeld-out strict accuracy (%) by caption family: every part of the caption right, "
        "checked by the exact verifier; mean ± standard error over seeds (n = held-out images per run).\n\n"
        + "\n".join(lines)
        + "\n\nHeld-out accuracy (%) of each caption part, all families pooled:\n\n"
        + "\n".join(parts)
        + "\n\nAgainst the base model on the same fixed-seed images (paired):\n\n"
        + "\n".join(changes)
        + "\n"
    )


CURVE_AXES = (("stage", "stages trained"), ("images", "images sampled"), ("unet_rows", "UNet rows (compute)"))


def plot(results: dict, path: Path) -> None:
    """``study.png``: final strict accuracy per family (bars ± stderr), and held-out strict accuracy against stages,
    images sampled and UNet rows (mean over seeds with a ± stderr band per algorithm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    labels = list(results["summary"])
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        e = results["summary"][label]
        xs = np.arange(len(FAMILY_COLUMNS)) + (k - (len(labels) - 1) / 2) * width
        axes[0].bar(xs, [100 * e[f][0] for f in FAMILY_COLUMNS], width, yerr=[100 * e[f][1] for f in FAMILY_COLUMNS],
                    label=label, capsize=3, color=f"C{k}")
    axes[0].set_xticks(np.arange(len(FAMILY_COLUMNS)), FAMILY_COLUMNS)
    axes[0].set_ylabel("held-out strict accuracy (%)")
    axes[0].legend(fontsize=8)
    for ax, (key, name) in zip(axes[1:], CURVE_AXES, strict=True):
        for label in labels[1:]:
            curves = [r["points"] for k, r in results["runs"].items() if k.split("/")[0] == label]
            if any(p[key] is None for c in curves for p in c) or len({len(c) for c in curves}) != 1:
                continue
            xs = np.mean([[p[key] for p in c] for c in curves], axis=0)
            values = np.array([[100 * p["strict"] for p in c] for c in curves])
            err = values.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else 0 * values[0]
            color = f"C{labels.index(label)}"  # the bars' colour of the algorithm
            ax.plot(xs, values.mean(axis=0), marker="o", label=label, color=color)
            ax.fill_between(xs, values.mean(axis=0) - err, values.mean(axis=0) + err, alpha=0.2, color=color)
        ax.set_xlabel(name)
        ax.set_ylabel("held-out strict accuracy, all families (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    algorithms, seeds = args.algorithms.split(","), [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(a, s) for s in seeds for a in algorithms]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = list(pool.map(lambda job: run_one(args, job[0], job[1], threads), jobs))
    results = collect(dict(zip(jobs, dirs, strict=True)))
    command = "python -m testbed.study " + " ".join(argv if argv is not None else sys.argv[1:])
    n_images = {f: v["n"] for f, v in next(iter(results["runs"].values()))["base"].items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["wall_min"] = (time.perf_counter() - start) / 60
    write_json(out / "study.json", results)
    text = markdown(results, command.strip(), n_images)
    atomic_write(out / "study.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plot(results, out / "study.png")
    logger.info("study written to %s (%.1f min)\n%s", out, results["wall_min"], text)


if __name__ == "__main__":
    main()
