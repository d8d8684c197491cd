"""Pictures for people: labelled image grids and the training curves of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from srrl.rundir import atomic_write


def image_grid(
    images: torch.Tensor, labels: Sequence[str], columns: int, cell: int = 128, max_rows: int = 8
) -> Image.Image:
    """A grid of ``images`` [N, 3, H, W] in [0, 1], ``columns`` per row, each cell captioned with its label."""
    n = min(images.shape[0], columns * max_rows)
    rows = -(-n // columns)
    label_h = 24
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images[:n].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        tile = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (x, y + label_h))
        text = labels[i]
        draw.text((x + 2, y + 1), text[:22], fill="black")
        if len(text) > 22:
            draw.text((x + 2, y + 12), text[22:44], fill="black")
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def plot_curves(metrics: Sequence[dict], evals: Sequence[dict], path: Path) -> None:
    """``curves.png``: reward mean ± std per stage, held-out reward, loss, and selected positives/negatives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    stages = [m["stage"] for m in metrics]
    mean = np.array([m["reward_mean"] for m in metrics], dtype=float)
    std = np.array([m["reward_std"] for m in metrics], dtype=float)
    axes[0].plot(stages, mean, marker="o", label="training reward")
    axes[0].fill_between(stages, mean - std, mean + std, alpha=0.2)
    if evals:
        e_stage = [e["after_stage"] for e in evals]
        e_mean = np.array([e["reward_mean"] for e in evals], dtype=float)
        e_err = np.array([e.get("reward_stderr", 0.0) for e in evals], dtype=float)
        axes[0].errorbar(e_stage, e_mean, yerr=e_err, marker="s", label="held-out reward (± s.e.)")
    axes[0].set_title("reward")
    axes[0].legend(fontsize=8)
    loss = [m["loss"] if m["loss"] is not None else np.nan for m in metrics]
    axes[1].plot(stages, loss, marker="o")
    axes[1].set_title("PPO loss")
    axes[2].bar(np.array(stages) - 0.2, [m["n_pos"] for m in metrics], width=0.4, label="positives")
    axes[2].bar(np.array(stages) + 0.2, [m["n_neg"] for m in metrics], width=0.4, label="negatives")
    axes[2].set_title("selected samples")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("stage")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
