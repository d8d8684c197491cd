"""Pictures for people: labelled image grids and the training curves of a run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from srrl.rundir import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LABEL_MARGIN = 2  # pixels left of, right of and above a cell's label


def _fit_prefix(word: str, width: float, measure: Callable[[str], float]) -> int:
    """The length (>= 1) of the longest prefix of ``word`` that fits ``width``; 1 when not even a character does."""
    cut = 1
    while cut < len(word) and measure(word[: cut + 1]) <= width:
        cut += 1
    return cut


def wrap_label(text: str, width: float, measure: Callable[[str], float]) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` (as ``measure`` tells the width of a string).

    Nothing is dropped: joining the lines with single spaces gives the words of ``text`` back. Only a word that
    is wider than a line on its own is broken between characters (its pieces on consecutive lines).
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if measure(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and measure(word) > width:
            cut = _fit_prefix(word, width, measure)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Pixels from one label line to the next in ``font`` (its tallest glyphs plus a pixel of leading)."""
    top, bottom = font.getbbox("Ag|")[1::2]
    return int(bottom - min(top, 0)) + 1


def fit_cell(pixels: np.ndarray, cell: int) -> Image.Image:
    """``pixels`` [H, W, 3] (uint8) resized to ``cell`` x ``cell`` for a grid cell.

    A picture larger than the cell (a 512 or 1024 px sample) is shrunk with a Lanczos filter, which averages the
    detail that falls between the cell's pixels; nearest-neighbour would pick single pixels and alias (a fine
    pattern could come out all black). A picture no larger than the cell (the 32 px testbed) is enlarged with
    nearest-neighbour, so that its pixels stay sharp squares.
    """
    image = Image.fromarray(pixels)
    shrinks = image.width > cell or image.height > cell
    return image.resize((cell, cell), Image.Resampling.LANCZOS if shrinks else Image.Resampling.NEAREST)


def image_grid(
    images: torch.Tensor, labels: Sequence[str], columns: int, cell: int = 128, max_rows: int = 8
) -> Image.Image:
    """A grid of ``images`` [N, 3, H, W] in [0, 1], ``columns`` per row, each cell captioned with its label.

    Each image is fitted to its ``cell`` x ``cell`` square by :func:`fit_cell` (filtered when shrunk, nearest
    when enlarged). Labels are wrapped at word boundaries to the cell width and shown in full; the label band
    above every row is as tall as the label with the most lines needs (at least one line).
    """
    n = min(images.shape[0], columns * max_rows)
    rows = -(-n // columns)
    font = ImageFont.load_default()
    width = cell - 2 * LABEL_MARGIN
    wrapped = [wrap_label(labels[i], width, font.getlength) for i in range(n)]
    line_h = _line_height(font)
    label_h = max([1, *map(len, wrapped)]) * line_h + 2 * LABEL_MARGIN
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images[:n].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        grid.paste(fit_cell(pixels[i], cell), (x, y + label_h))
        for k, line in enumerate(wrapped[i]):
            draw.text((x + LABEL_MARGIN, y + LABEL_MARGIN + k * line_h), line, fill="black", font=font)
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` to ``path`` as PNG, atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _values(records: Sequence[dict], key: str) -> np.ndarray:
    """``record[key]`` of every record as floats, NaN where it is None or missing (a stage without an update)."""
    return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)


def integer_stage_axis(ax: Axes, stages: Sequence[int]) -> None:
    """Label the x axis of ``ax`` "stage", span ``stages`` (half a stage of margin) and tick whole stages only.

    The span matters: a panel whose only finite point is one stage would otherwise be autoscaled to a sliver
    around it, where no two integers fit and the locator falls back to fractional ticks.
    """
    from matplotlib.ticker import MaxNLocator

    if len(stages):
        ax.set_xlim(min(stages) - 0.5, max(stages) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("stage")


def _reward_panel(ax: Axes, metrics: Sequence[dict], evals: Sequence[dict]) -> None:
    stages = [m["stage"] for m in metrics]
    mean, std = _values(metrics, "reward_mean"), _values(metrics, "reward_std")
    ax.plot(stages, mean, marker="o", label="training reward")
    ax.fill_between(stages, mean - std, mean + std, alpha=0.2)
    if evals:
        e_err = np.array([e.get("reward_stderr", 0.0) for e in evals], dtype=float)
        ax.errorbar([e["after_stage"] for e in evals], _values(evals, "reward_mean"), yerr=e_err, marker="s",
                    label="held-out reward (± s.e.)")
    ax.set_title("reward")
    ax.legend(fontsize=8)


def _kl_panel(ax: Axes, metrics: Sequence[dict]) -> None:
    """Approx-KL (left axis) and clip fraction (right axis) per stage; gaps where a stage had no update."""
    stages = [m["stage"] for m in metrics]
    kl_line = ax.plot(stages, _values(metrics, "approx_kl"), marker="o", color="tab:purple", label="approx-KL")
    ax.set_ylabel("approx-KL")
    right = ax.twinx()
    clip_line = right.plot(stages, _values(metrics, "clipfrac"), marker="^", color="tab:orange",
                           label="clip fraction")
    right.set_ylabel("clip fraction")
    ax.legend(handles=kl_line + clip_line, fontsize=8)
    ax.set_title("approx-KL and clip fraction")


def curves_figure(metrics: Sequence[dict], evals: Sequence[dict]) -> Figure:
    """The figure of ``curves.png``: reward mean ± std per stage with the held-out reward, PPO loss, selected
    positives/negatives, and approx-KL with clip fraction; the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    stages = np.array([m["stage"] for m in metrics])
    _reward_panel(axes[0], metrics, evals)
    axes[1].plot(stages, _values(metrics, "loss"), marker="o")
    axes[1].set_title("PPO loss")
    axes[2].bar(stages - 0.2, [m["n_pos"] for m in metrics], width=0.4, label="positives")
    axes[2].bar(stages + 0.2, [m["n_neg"] for m in metrics], width=0.4, label="negatives")
    axes[2].set_title("selected samples")
    axes[2].legend(fontsize=8)
    _kl_panel(axes[3], metrics)
    shown = [*stages.tolist(), *(e["after_stage"] for e in evals)]
    for ax in axes:
        integer_stage_axis(ax, shown)
    fig.tight_layout()
    return fig


def plot_curves(metrics: Sequence[dict], evals: Sequence[dict], path: Path) -> None:
    """Write :func:`curves_figure` to ``path`` (``curves.png``), atomically."""
    fig = curves_figure(metrics, evals)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
