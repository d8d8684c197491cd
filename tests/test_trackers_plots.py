"""The run's trackers (tensorboard and offline wandb on one step axis), the image grid's labels and curves.png."""

from __future__ import annotations

import glob
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from PIL import ImageFont

from srrl.distributed import make_accelerator
from srrl.plots import curves_figure, image_grid, wrap_label
from srrl.trackers import StageLogger

PROMPT_60 = "a small red square to the left of a large blue circle at six"  # 60 characters
BASELINE, AFTER_0 = 0.25, 0.5  # held-out reward before training and after stage 0


def logging_config(tracker: str) -> ml_collections.ConfigDict:
    """Just what StageLogger reads, plus a list value (tensorboard's hparams refuse lists)."""
    return ml_collections.ConfigDict({
        "logging": {"tracker": tracker, "project": "srrl", "log_images": True},
        "curriculum": {"stage_cnt": [1, 2]},
        "seed": 0,
    })


def stage_record(stage: int, approx_kl: float | None = 0.01) -> dict:
    """A metrics.jsonl record with what the trackers and curves read (None KL / clip fraction: no update)."""
    return {"stage": stage, "reward_mean": 0.1 * (stage + 1), "reward_std": 0.05, "loss": 0.2, "n_pos": 2,
            "n_neg": 1, "approx_kl": approx_kl, "clipfrac": None if approx_kl is None else 0.1}


def eval_record(after_stage: int, mean: float) -> dict:
    """An eval.jsonl record with one verifier family."""
    return {"after_stage": after_stage, "reward_mean": mean, "reward_stderr": 0.01, "n": 4,
            "verifier": {"count": {"accuracy": mean}}}


def drive(log: StageLogger, stages: int = 2) -> None:
    """What the trainer does with ``eval.every=1``: evaluate(-1), then per stage its record and evaluation."""
    metrics: list[dict] = []
    evals = [eval_record(-1, BASELINE)]
    log.evaluation(evals[-1], evals, metrics)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for stage in range(stages):
        metrics.append(stage_record(stage))
        log.stage(metrics[-1], metrics, evals, images, [f"0.5{i} {PROMPT_60}" for i in range(4)], 2, {})
        evals.append(eval_record(stage, AFTER_0 if stage == 0 else 0.75))
        log.evaluation(evals[-1], evals, metrics)
    log.finish()


def test_tensorboard_scalars_and_grid_on_the_stages_completed_axis(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = make_accelerator("no", "tensorboard")  # the trainer's call: no run directory yet
    drive(StageLogger(accelerator, logging_config("tensorboard"), tmp_path))
    (events_dir,) = {Path(p).parent for p in glob.glob(str(tmp_path / "tensorboard" / "*" / "events.out.*"))}
    events = EventAccumulator(str(events_dir))
    events.Reload()
    held_out = [(e.step, e.value) for e in events.Scalars("eval/reward_mean")]
    assert held_out == [(0, BASELINE), (1, AFTER_0), (2, 0.75)]
    assert [e.step for e in events.Scalars("eval/count/accuracy")] == [0, 1, 2]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/reward_mean")] == [(1, 0.1), (2, 0.2)]
    grids = events.Images("images")
    assert [g.step for g in grids] == [1, 2] and grids[0].height > 16 and grids[0].width == 2 * 128
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "images" / "stage_000.png").is_file()


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header: crc32c, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"unknown .wandb header {data[:7]!r}"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_keeps_the_baseline_at_its_own_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    accelerator = make_accelerator("no", "wandb")
    log = StageLogger(accelerator, logging_config("wandb"), tmp_path)
    tracker, sent = accelerator.get_tracker("wandb"), []
    passed_on = tracker.log
    monkeypatch.setattr(tracker, "log", lambda values, step=None, **kw: (sent.append((step, set(values))),
                                                                        passed_on(values, step=step, **kw)))
    drive(log)
    steps = [step for step, _ in sent]
    assert steps == sorted(steps) and steps[0] == 0 and "eval/reward_mean" in sent[0][1]
    assert [step for step, keys in sent if "eval/reward_mean" in keys] == [0, 1, 2]
    (path,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    rows = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
            rows[record.history.step.num] = items
    assert sorted(rows) == [0, 1, 2]
    assert float(rows[0]["eval/reward_mean"]) == BASELINE and "train/reward_mean" not in rows[0]
    assert float(rows[1]["eval/reward_mean"]) == AFTER_0 and "train/reward_mean" in rows[1]
    assert rows[1]["images/_type"] == '"image-file"' and "images/_type" in rows[2]


def test_labels_wrap_at_words_and_keep_the_whole_prompt() -> None:
    font = ImageFont.load_default()
    label = f"0.734 {PROMPT_60}"
    lines = wrap_label(label, 124, font.getlength)
    assert len(PROMPT_60) == 60 and len(lines) >= 3
    assert " ".join(lines).split() == label.split() and " ".join(lines) == label
    assert all(font.getlength(line) <= 124 for line in lines)
    long_word = "x" * 80
    pieces = wrap_label(f"ok {long_word} end", 124, font.getlength)
    assert pieces[0] == "ok" and len(pieces) >= 3 and "".join(pieces[1:]) == f"{long_word} end"  # the tail goes on
    assert all(font.getlength(p) <= 124 for p in pieces) and wrap_label("", 124, font.getlength) == []


def test_the_label_band_grows_with_the_longest_label() -> None:
    images = torch.zeros(4, 3, 8, 8)
    short = image_grid(images, ["0.1 a cat"] * 4, columns=2)
    long = image_grid(images, ["0.1 a cat", "0.2 a dog", f"0.734 {PROMPT_60}", "0.3 x"], columns=2)
    assert short.width == long.width == 256
    band_short, band_long = short.height // 2 - 128, long.height // 2 - 128
    assert band_long >= 3 * band_short - 8 > band_short
    top = long.height // 2  # the long label is the first of the second row
    ink_rows = np.nonzero((np.asarray(long)[top : top + band_long, :128] < 128).any(axis=(1, 2)))[0]
    assert ink_rows.max() > band_long // 2  # its third line is drawn, not cut off


def _cell_pixels(grid, column: int, cell: int = 128) -> np.ndarray:
    """The picture part of a one-row grid's cell ``column`` (below its label band), as floats."""
    band = grid.height - cell
    return np.asarray(grid, dtype=np.float64)[band:, column * cell : (column + 1) * cell]


@pytest.mark.parametrize("size", [512, 1024, 300])
def test_large_samples_are_shrunk_with_a_filter_not_aliased(size: int) -> None:
    """A one-pixel checkerboard shrunk to a cell averages to mid-grey. Nearest-neighbour would sample every
    4th (8th) pixel of the 512 (1024) px board and show a solid black or white square."""
    board = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2
    images = board.float().expand(1, 3, size, size)
    cell = _cell_pixels(image_grid(images, ["board"], columns=1), 0)
    assert cell.shape == (128, 128, 3)
    assert abs(cell.mean() - 127.5) < 3 and np.abs(cell - 127.5).max() < 16, (cell.mean(), cell.min(), cell.max())


def test_small_samples_are_enlarged_as_sharp_blocks() -> None:
    """A 32 px testbed picture enlarged to a 128 px cell keeps hard 4x4 pixel blocks with its exact colours."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 32, 32, generator=generator) * 255).round() / 255
    grid = image_grid(images, ["a", "b"], columns=2)
    for i in range(2):
        cell = _cell_pixels(grid, i)
        expected = (images[i].permute(1, 2, 0).numpy() * 255).round()
        assert np.array_equal(cell, expected.repeat(4, axis=0).repeat(4, axis=1))


def test_curves_have_integer_stage_ticks_and_a_kl_clipfrac_panel() -> None:
    import matplotlib.pyplot as plt

    metrics = [stage_record(0), stage_record(1, approx_kl=None)]
    fig = curves_figure(metrics, [eval_record(-1, BASELINE), eval_record(0, AFTER_0), eval_record(1, 0.75)])
    try:
        for ax in [ax for ax in fig.axes if ax.xaxis.get_visible()]:  # not the clip fraction's twin
            ticks = ax.get_xticks()
            assert len(ticks) and np.array_equal(ticks, np.round(ticks)), (ax.get_title(), ticks)
        titles = [ax.get_title() for ax in fig.axes]
        assert {"reward", "PPO loss", "selected samples", "approx-KL and clip fraction"} <= set(titles)
        kl_axes = fig.axes[titles.index("approx-KL and clip fraction")]
        twins = [ax for ax in fig.axes if ax is not kl_axes and ax.get_shared_x_axes().joined(ax, kl_axes)]
        (kl,) = kl_axes.get_lines()
        (clip,) = twins[0].get_lines()
        assert kl.get_ydata()[0] == 0.01 and np.isnan(kl.get_ydata()[1])
        assert clip.get_ydata()[0] == 0.1 and np.isnan(clip.get_ydata()[1])
    finally:
        plt.close(fig)
    for evals in ([], [eval_record(-1, BASELINE), eval_record(0, AFTER_0)]):  # one stage: still whole stages
        fig = curves_figure([stage_record(0, approx_kl=None)], evals)
        ticks = fig.axes[0].get_xticks()
        plt.close(fig)
        assert 0 in ticks and np.array_equal(ticks, np.round(ticks)), ticks
