"""The layout's import rules, read from the source (AST), lazy imports inside functions included.

Layers, bottom up: ``shapes`` and ``config`` (leaves); ``rewards`` (the reward registry: may use the shapes world
and ``srrl.errors``); ``srrl`` (the core: itself and the reward registry); ``testbed`` (uses the core); ``cli`` and
the scripts at the top (the entry wiring). Nothing imports upwards, directly or through another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shapes", "config", "rewards", "srrl", "testbed", "cli")
#: Per package, the project modules (prefixes) its modules may import directly.
ALLOWED: dict[str, tuple[str, ...]] = {
    "shapes": ("shapes",),
    "config": ("config",),
    "rewards": ("rewards", "shapes", "srrl.errors", "config"),
    "srrl": ("srrl", "rewards"),
    "testbed": ("testbed", "srrl", "shapes", "rewards", "config"),
    "cli": ("cli", "testbed", "srrl", "shapes", "rewards", "config"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (absolute imports; the project uses no others)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def modules() -> dict[str, set[str]]:
    """Every project module with the project modules it imports (names of modules, not of their attributes)."""
    paths = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in paths.items():
        imported = set()
        for target in project_imports(path):
            while target and target not in paths:  # "srrl.models.load_sd_model" -> "srrl.models"
                target = target.rpartition(".")[0]
            if target and target != name:
                imported.add(target)
        out[name] = imported
    return out


def allowed(package: str, target: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in ALLOWED[package])


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_a_layer_above_it(package):
    graph = modules()
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() if m.split(".")[0] == package for t in ts
                 if not allowed(package, t))
    assert not bad, bad


def test_the_core_reaches_no_testbed_or_entry_module_even_indirectly():
    graph = modules()
    for start in [m for m in graph if m.split(".")[0] == "srrl"]:
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()] - seen:
                seen.add(t)
                todo.append(t)
        upward = sorted(t for t in seen if t.split(".")[0] in ("testbed", "cli"))
        assert not upward, f"{start} reaches {upward}"


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a core module that imports the testbed is reported."""
    (tmp_path / "srrl").mkdir()
    (tmp_path / "srrl" / "bad.py").write_text("def f():\n    from testbed.tiny_xl import resolve_builtin\n")
    imports = project_imports(tmp_path / "srrl" / "bad.py")
    assert imports == {"testbed.tiny_xl", "testbed.tiny_xl.resolve_builtin"}
    assert not allowed("srrl", "testbed.tiny_xl")
    assert allowed("srrl", "rewards.rewards") and not allowed("rewards", "srrl.models")


def test_every_package_is_installed():
    """pyproject's package list names every package of the layout and each of their subpackages (setuptools installs
    only the listed ones: a fresh non-editable install has them all)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    line = next(row for row in text.splitlines() if row.startswith("packages = "))
    listed = set(ast.literal_eval(line.split("=", 1)[1].strip()))
    found = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert listed == found and {name.split(".")[0] for name in listed} == set(PACKAGES)


#: Classes that belong to one model family (its pipeline, denoiser, text encoders): only srrl/families/ names them.
FAMILY_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                  "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "CLIPTextModel",
                  "T5EncoderModel", "CLIPPromptEncoder", "SDXLPromptEncoder", "SD3PromptEncoder", "FluxPromptEncoder",
                  "FluxDenoiser")


def family_class_mentions(root: Path) -> list[str]:
    """``file: Class`` for every family class named by a core module outside ``srrl/families/``."""
    core = [p for p in (root / "srrl").rglob("*.py") if "families" not in p.relative_to(root / "srrl").parts]
    return sorted(f"{p.relative_to(root)}: {name}" for p in core for name in FAMILY_CLASSES
                  if name in p.read_text(encoding="utf-8"))


def test_no_core_module_names_a_family_class(tmp_path):
    assert not family_class_mentions(ROOT)
    (tmp_path / "srrl" / "families").mkdir(parents=True)
    (tmp_path / "srrl" / "families" / "sd.py").write_text("from diffusers import StableDiffusionPipeline\n")
    (tmp_path / "srrl" / "bad.py").write_text("pipe = FluxPipeline  # not here\n")
    assert family_class_mentions(tmp_path) == ["srrl/bad.py: FluxPipeline"]
