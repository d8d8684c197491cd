"""Cost of one held-out pass per UNet dtype: ``python bench/eval_bench.py --dtypes float32 bfloat16``.

Builds the trainer of a preset (default ``tiny``: the testbed model, its 8 held-out counting captions) and times its held-out
evaluation (``srrl.heldout.evaluate_heldout``: generation, decoding, verifier and reward) ``--repeats`` times for
each ``eval.dtype``, and prints a Markdown table: median wall seconds, milliseconds per image, the ratio to the
first dtype, and the held-out strict accuracy of the base model (the outcomes differ a little between dtypes).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cli.wiring import trainer_for  # noqa: E402  (the entry wiring: family loader and the shapes verifier)
from config.stage_process import get_config  # noqa: E402


def bench(preset: str, dtype: str, images_per_prompt: int, repeats: int) -> dict:
    """Median wall time of ``repeats`` held-out passes with ``eval.dtype = dtype``."""
    config = get_config(preset)
    config.eval.dtype = dtype
    if images_per_prompt:
        config.eval.num_images_per_prompt = images_per_prompt
    with tempfile.TemporaryDirectory() as tmp:
        config.save_path = tmp
        trainer = trainer_for(config)
        times, record = [], {}
        for _ in range(repeats):
            start = time.perf_counter()
            record = trainer.evaluate(-1)
            times.append(time.perf_counter() - start)
    strict = record.get("verifier", {}).get("all", {}).get("strict", float("nan"))
    return {"dtype": dtype or "(run's)", "n": record["n"], "wall": statistics.median(times), "strict": strict}


def table(rows: list[dict]) -> str:
    lines = ["| eval.dtype | images | wall s (median) | ms per image | time vs first | base strict accuracy |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['n']} | {r['wall']:.1f} | {1000 * r['wall'] / r['n']:.1f} | "
                     f"{r['wall'] / rows[0]['wall']:.2f} | {100 * r['strict']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--images-per-prompt", type=int, default=0, help="0: the preset's eval.num_images_per_prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    report = table([bench(args.preset, d, args.images_per_prompt, args.repeats) for d in args.dtypes])
    machine = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
    print(f"preset {args.preset}; {machine}; total {time.time() - start:.0f} s (medians of {args.repeats} passes)"  # noqa: T201
          f"\n\n{report}")


if __name__ == "__main__":
    main()
