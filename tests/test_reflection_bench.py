"""bench/reflection.py's paired summaries, by round count and by caption family, on hand-made outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    return load_script(ROOT / "bench" / "reflection.py")


def test_by_rounds_pairs_each_count_with_zero_rounds():
    bench = load_bench()
    acc = {0: torch.tensor([1.0, 0.0, 0.0, 1.0]), 1: torch.tensor([1.0, 1.0, 0.0, 0.0])}
    out = bench.by_rounds(acc)
    assert out[0] == {"accuracy": 0.5, "change": 0.0, "change_se": 0.0, "n": 4}
    d = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    assert out[1]["change"] == pytest.approx(0.0) and out[1]["change_se"] == pytest.approx(float(d.std() / 2))


def test_by_family_splits_images_by_caption_family():
    bench = load_bench()
    prompts = ["a red circle", "two blue squares", "a red circle above a green square", "a blue triangle"]
    acc = {0: torch.tensor([1.0, 0.0, 0.0, 1.0]), 1: torch.tensor([0.0, 1.0, 1.0, 1.0])}
    out = bench.by_family(prompts, acc)
    assert list(out) == ["single", "count", "relation"]
    assert out["single"][0]["n"] == 2 and out["single"][1]["change"] == pytest.approx(-0.5)
    assert out["count"][1]["accuracy"] == 1.0 and out["relation"][1]["change"] == pytest.approx(1.0)
