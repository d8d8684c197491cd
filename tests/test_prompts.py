"""The prompt sets of docs/algorithm.md §6 in config/prompt: well-formed, sized, and train/test disjoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

PROMPT_DIR = Path(__file__).resolve().parents[1] / "config" / "prompt"
# docs/algorithm.md §6 categories -> allowed prompt count per split.
CATEGORIES = {
    "animals": (20, 90),
    "colours": (20, 90),
    "spatial": (20, 90),
    "physics": (20, 90),
    "counterphysical": (20, 90),
    "case_balance": (1, 90),
    "case_cake_text": (1, 90),
    "case_cars_on_water": (1, 90),
}
PAIRS = sorted(p.name.removesuffix("_train.json") for p in PROMPT_DIR.glob("*_train.json"))


def _load(path: Path) -> list[str]:
    prompts = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(prompts, list), f"{path.name}: not a JSON list"
    assert all(isinstance(p, str) and p.strip() == p and p for p in prompts), f"{path.name}: empty or padded prompt"
    assert len(set(prompts)) == len(prompts), f"{path.name}: duplicate prompts"
    return prompts


def _key(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt.lower()).strip(" .")


def test_every_category_of_the_paper_is_present() -> None:
    assert set(CATEGORIES) <= set(PAIRS)


@pytest.mark.parametrize("name", PAIRS)
def test_split_is_well_formed_and_disjoint(name: str) -> None:
    train = _load(PROMPT_DIR / f"{name}_train.json")
    test_file = PROMPT_DIR / f"{name}_test.json"
    assert test_file.is_file(), f"{name}_train.json has no held-out {test_file.name}"
    test = _load(test_file)
    low, high = CATEGORIES.get(name, (1, 1000))
    assert low <= len(train) <= high and low <= len(test) <= high, (name, len(train), len(test))
    shared = {_key(p) for p in train} & {_key(p) for p in test}
    assert not shared, f"{name}: prompts in both splits: {sorted(shared)[:3]}"


def test_animal_test_split_swaps_activities() -> None:
    """Every held-out animal and activity appears in training, but never in the same pairing."""
    train = _load(PROMPT_DIR / "animals_train.json")
    test = _load(PROMPT_DIR / "animals_test.json")
    pairs = dict(re.match(r"(an? [a-z]+(?: bear)?) (.+)", p).groups() for p in train)
    for prompt in test:
        animal, activity = re.match(r"(an? [a-z]+(?: bear)?) (.+)", prompt).groups()
        assert animal in pairs and activity in pairs.values(), prompt
        assert pairs[animal] != activity, prompt
