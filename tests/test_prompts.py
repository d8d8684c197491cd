"""The prompt sets of docs/algorithm.md §6 in config/prompt: well-formed, sized, and train/test disjoint; the
original code's sets exactly as scripts/make_prompt_sets.py writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import load_script

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


GENERATOR = load_script(PROMPT_DIR.parents[1] / "scripts" / "make_prompt_sets.py")
ORIGINAL_SETS = GENERATOR.prompt_sets()
# The original's sets that it ships without a held-out split (template4/5, single1-3): kept so, not invented.
TRAIN_ONLY = sorted(n.removesuffix("_train") for n in ORIGINAL_SETS
                    if n.endswith("_train") and n.replace("_train", "_test") not in ORIGINAL_SETS)
# The testbed's full training set, held out against testbed_test.json (tests/test_testbed_world.py).
TESTBED_TRAIN_ONLY = ("testbed_full",)
PAIRS = sorted(p.name.removesuffix("_train.json") for p in PROMPT_DIR.glob("*_train.json")
               if p.name.removesuffix("_train.json") not in (*TRAIN_ONLY, *TESTBED_TRAIN_ONLY))


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


def test_the_original_sets_are_exactly_what_the_generator_writes(tmp_path: Path) -> None:
    """Rewriting with scripts/make_prompt_sets.py changes no byte of the checked-in files."""
    assert GENERATOR.main(["--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"{name}.json" for name in ORIGINAL_SETS)
    for name in written:
        assert (PROMPT_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert GENERATOR.main(["--check"]) == 0
    (tmp_path / "template2_test.json").write_text("[]\n")
    assert GENERATOR.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", TRAIN_ONLY)
def test_train_only_original_sets_are_well_formed(name: str) -> None:
    assert not (PROMPT_DIR / f"{name}_test.json").exists()
    assert _load(PROMPT_DIR / f"{name}_train.json")


def test_original_sizes() -> None:
    """The counts of the original's files: template1 45/90, template2 40/40, template3 40/30, 20, 20, 1, 1, 1."""
    sizes = {name: len(_load(PROMPT_DIR / f"{name}.json")) for name in ORIGINAL_SETS}
    assert sizes == {"template1_train": 45, "template1_test": 90, "template2_train": 40, "template2_test": 40,
                     "template3_train": 40, "template3_test": 30, "template4_train": 20, "template5_train": 20,
                     "single1_train": 1, "single2_train": 1, "single3_train": 1}


def test_original_animal_split_holds_every_other_pairing() -> None:
    """template1: train and test together are every animal with every activity, each pairing once."""
    train = _load(PROMPT_DIR / "template1_train.json")
    test = _load(PROMPT_DIR / "template1_test.json")
    every = {f"a {animal} {activity}" for animal in GENERATOR.ANIMALS for activity in GENERATOR.ACTIVITIES}
    assert set(train).isdisjoint(test) and set(train) | set(test) == every
    assert all(sum(p.startswith(f"a {a} ") for p in train) == 1 for a in GENERATOR.ANIMALS)


def test_original_colour_split_never_repeats_a_training_colour() -> None:
    """template2: a fruit's test colour is none of its training colours; the vegetables are test-only."""
    train = set(_load(PROMPT_DIR / "template2_train.json"))
    for fruit, colours, held_out in GENERATOR.FRUITS:
        assert {f"{c} {fruit}" for c in colours} <= train and held_out not in colours, fruit
    assert not any(p.endswith(f" {veg}") for veg, _ in GENERATOR.VEGETABLES for p in train)
