"""The testbed study driver (testbed.study): argument checks, aggregation, tables, plot, and one tiny real study."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

import testbed.study
from testbed.study import collect, finished, markdown, parse_args, plot, run_name, run_one

FAMILIES = ("single", "count", "relation", "all")


# ---------------------------------------------------------------------------------------- (a) args
@pytest.mark.parametrize("argv", [
    ["--algorithms", "srrl,ppo"],
    ["--algorithms", "nope"],
    ["--algorithms", "grpo:dpo"],
    ["--algorithms", "nope:nft"],
    ["--algorithms", "grpo:nft+train.beta2"],
    ["--seeds", "0,x"],
    ["--seeds", "1.5"],
    ["--seeds", ""],
    ["--jobs", "0"],
])  # fmt: skip
def test_parse_args_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--seeds=0,-1"], ["--seeds=0,0"], ["--algorithms=srrl,srrl"]])
def test_parse_args_rejects_negative_or_repeated_values(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_parse_args_defaults_and_values():
    args = parse_args([])
    assert args.algorithms == "srrl,b2diffurl,ddpo,grpo" and args.seeds == "0,1,2" and args.preset == "testbed"
    args = parse_args(["--algorithms", "ddpo", "--seeds", "3,4", "--jobs", "1", "--set", "a=1", "--set", "b=2"])
    assert args.algorithms == "ddpo" and args.seeds == "3,4" and args.jobs == 1 and args.set == ["a=1", "b=2"]
    assert parse_args(["--algorithms", "srrl,grpo:ppo,grpo:nft"]).algorithms == "srrl,grpo:ppo,grpo:nft"
    assert run_name("testbed", "grpo:nft", 2) == "testbed_grpo-nft_s2"
    assert run_name("testbed", "grpo:nft+train.beta2=1", 0) == "testbed_grpo-nft_train.beta21_s0"


def test_an_arm_with_an_objective_sets_it(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = parse_args(["--algorithms", "grpo:nft+train.beta2=1", "--runs", str(tmp_path)])
    with pytest.raises(RuntimeError, match="testbed_grpo-nft_train.beta21_s0 failed"):
        run_one(args, "grpo:nft+train.beta2=1", 0, 1)
    assert {"--config.algorithm=grpo", "--config.train.objective=nft", "--config.train.beta2=1"} <= set(seen[0])


# ------------------------------------------------------------------------------ (b) fabricated runs
def verifier(strict: dict[str, float], n: dict[str, int] | None = None) -> dict:
    """A family_summary-like dict: per family n and strict (and parts for "all")."""
    n = n or {"single": 4, "count": 8, "relation": 2, "all": 14}
    out = {f: {"n": float(n[f]), "strict": strict[f], "strict_stderr": 0.0} for f in strict}
    out["all"].update({"colour": strict["all"] + 0.3, "shape": strict["all"] + 0.2, "count": strict["all"] + 0.1,
                       "relation": strict["all"]})
    return out


def fabricate(root: Path, name: str, base: float, final: float, stage_times: list[float], total: int = 2,
              last: int | None = None) -> Path:
    """A run directory with config.json, eval.jsonl (before training and after stage ``last``, default the last
    stage) and metrics.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"curriculum": {"total_stages": total}}))
    evals = [
        {"after_stage": -1, "verifier": verifier({f: base for f in FAMILIES})},
        {"after_stage": total - 1 if last is None else last, "verifier": verifier({f: final + 0.01 * k for k, f in enumerate(FAMILIES)})},
    ]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    metrics = [{"stage": s, "time_stage_s": t} for s, t in enumerate(stage_times)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


@pytest.fixture()
def fabricated(tmp_path) -> dict[tuple[str, int], Path]:
    return {
        ("srrl", 0): fabricate(tmp_path, "srrl_0", 0.2, 0.5, [60.0, 60.0]),
        ("srrl", 1): fabricate(tmp_path, "srrl_1", 0.2, 0.7, [90.0, 30.0]),
        ("ddpo", 0): fabricate(tmp_path, "ddpo_0", 0.2, 0.3, [30.0, 30.0]),
    }


def test_finished(tmp_path, fabricated):
    assert finished(fabricated[("srrl", 0)])
    assert not finished(tmp_path / "missing")
    partial = fabricate(tmp_path, "partial", 0.1, 0.2, [1.0], total=3, last=1)  # evaluated up to stage 1 of 3
    assert not finished(partial)


def test_collect_means_and_stderr(fabricated):
    results = collect(fabricated)
    assert set(results["runs"]) == {"srrl/0", "srrl/1", "ddpo/0"}
    assert results["runs"]["srrl/1"]["curve"] == [(-1, 0.2), (1, 0.7 + 0.03)]
    assert results["runs"]["srrl/0"]["train_s"] == 120.0
    summary = results["summary"]
    assert list(summary) == ["base model", "srrl", "ddpo"]
    base = summary["base model"]
    assert base["seeds"] == 1 and base["train_min"] == 0.0
    assert all(base[f] == (pytest.approx(0.2), 0.0) for f in FAMILIES)
    srrl = summary["srrl"]
    assert srrl["seeds"] == 2 and srrl["train_min"] == pytest.approx(2.0)  # 120 s per run
    for k, f in enumerate(FAMILIES):  # finals 0.5 and 0.7 (+0.01 k): mean 0.6, stderr 0.2/sqrt2/sqrt2 = 0.1
        mean, stderr = srrl[f]
        assert mean == pytest.approx(0.6 + 0.01 * k) and stderr == pytest.approx(0.1)
    assert srrl["part:colour"] == (pytest.approx(0.6 + 0.03 + 0.3), pytest.approx(0.1))
    assert srrl["part:relation"] == (pytest.approx(0.63), pytest.approx(0.1))
    ddpo = summary["ddpo"]
    assert ddpo["seeds"] == 1 and ddpo["single"] == (pytest.approx(0.3), 0.0) and ddpo["train_min"] == 1.0


def test_markdown_rows(fabricated):
    results = collect(fabricated)
    text = markdown(results, "python -m testbed.study --seeds 0,1", {"single": 4, "count": 8, "relation": 2, "all": 14})
    assert "`python -m testbed.study --seeds 0,1`" in text
    assert "| | single (n=4) | count (n=8) | relation (n=2) | all (n=14) | seeds | train min/run |" in text
    lines = text.splitlines()
    for label in ("base model", "srrl", "ddpo"):
        rows = [line for line in lines if line.startswith(f"| {label} |")]
        assert len(rows) == (2 if label == "base model" else 3), (label, rows)  # one per table (paired: no base)
    srrl_family_row = next(line for line in lines if line.startswith("| srrl |"))
    assert srrl_family_row == "| srrl | 60.0 ± 10.0 | 61.0 ± 10.0 | 62.0 ± 10.0 | 63.0 ± 10.0 | 2 | 2.0 |"
    assert "| base model | 20.0 ± 0.0 | 20.0 ± 0.0 | 20.0 ± 0.0 | 20.0 ± 0.0 | 1 | 0.0 |" in lines
    ddpo_parts = [line for line in lines if line.startswith("| ddpo |")][1]
    assert ddpo_parts == "| ddpo | 63.0 ± 0.0 | 53.0 ± 0.0 | 43.0 ± 0.0 | 33.0 ± 0.0 |"
    assert "| srrl | seed 0: +33.0 ± 0.0; seed 1: +53.0 ± 0.0 |" in lines  # independent s.e. (no per-image outcomes)
    assert all("nan" not in line for line in lines)


def test_plot_writes_a_png(fabricated, tmp_path):
    path = tmp_path / "out" / "study.png"
    plot(collect(fabricated), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(path.parent.glob("*.tmp"))


def test_collect_single_only_evaluations(tmp_path):
    run = tmp_path / "srrl_0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"curriculum": {"total_stages": 1}}))
    entry = {"n": 4.0, "strict": 0.5, "strict_stderr": 0.25, "colour": 1.0, "shape": 0.5, "count": 1.0}
    evals = [{"after_stage": -1, "verifier": {"single": entry, "all": entry}},
             {"after_stage": 0, "verifier": {"single": entry, "all": entry}}]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run / "metrics.jsonl").write_text(json.dumps({"stage": 0, "time_stage_s": 1.0}) + "\n")
    results = collect({("srrl", 0): run})
    assert results["summary"]["srrl"]["single"] == (0.5, 0.0)
    assert all(math.isnan(v) for v in results["summary"]["srrl"]["part:relation"])
    assert "| srrl | 50.0 ± 0.0 | — | — |" in markdown(results, "cmd", {"single": 4})


# --------------------------------------------------------------------------------------- run_one
def study_args(tmp_path: Path, **kw) -> argparse.Namespace:
    return parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                       *[x for k, v in kw.items() for x in (f"--{k}", v)]])


def test_run_one_reuses_a_finished_run_and_builds_the_command(tmp_path, monkeypatch):
    args = study_args(tmp_path, set="sample.num_steps=3")
    runs = tmp_path / "runs"
    done = fabricate(runs, run_name("testbed", "srrl", 0), 0.1, 0.2, [1.0, 1.0])

    def no_subprocess(*a, **k):
        raise AssertionError("a finished run must not be started again")

    monkeypatch.setattr(testbed.study.subprocess, "run", no_subprocess)
    assert run_one(args, "srrl", 0, threads=1) == done

    calls = []

    class Done:
        returncode = 0

    def fake_run(cmd, env, stdout, stderr, check):
        calls.append((cmd, env))
        return Done()

    monkeypatch.setattr(testbed.study.subprocess, "run", fake_run)
    unfinished = fabricate(runs, run_name("testbed", "ddpo", 2), 0.1, 0.2, [1.0], total=3, last=0)
    with pytest.raises(RuntimeError, match=r"testbed_ddpo_s2 failed \(exit 0\).*testbed_ddpo_s2\.log"):
        run_one(args, "ddpo", 2, threads=3)
    (cmd, env), = calls
    assert cmd[1].endswith("train.py") and cmd[2].endswith("stage_process.py:testbed")
    assert {"--config.algorithm=ddpo", "--config.seed=2000", "--config.exp_name=testbed_ddpo_s2",
            f"--config.save_path={runs}", "--config.sample.num_steps=3", f"--config.resume_from={unfinished}"} <= set(cmd)
    assert env["OMP_NUM_THREADS"] == "3"


# ------------------------------------------------------------------------------- (c) a real study
EVAL_CAPTIONS = ["a red circle", "two blue squares", "a green triangle left of a yellow square"]


def test_real_study_end_to_end_and_reuse(testbed_pipe_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "eval.json"
    prompts.write_text(json.dumps(EVAL_CAPTIONS))
    sets = [
        f"pretrained.model={testbed_pipe_dir}", "curriculum.total_stages=1", "curriculum.stage_cnt=1",
        "eval.every=1", "sample.num_steps=3", "curriculum.split_left=1", "curriculum.split_right=3",
        "sample.batch_size=2", "sample.num_batches_per_epoch=1", "eval.num_images_per_prompt=1",
        f"eval.prompt_file={prompts}", "logging.log_images=False",
    ]  # fmt: skip
    argv = ["--algorithms", "srrl,ddpo", "--seeds", "0", "--jobs", "1", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), *[x for s in sets for x in ("--set", s)]]
    monkeypatch.setattr(testbed.study.os, "cpu_count", lambda: 1)  # one torch thread per run (a shared machine)
    testbed.study.main(argv)

    out, runs = tmp_path / "out", tmp_path / "runs"
    run_dirs = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert run_dirs == ["testbed_ddpo_s0", "testbed_srrl_s0"]
    for name in run_dirs:
        config = json.loads((runs / name / "config.json").read_text())
        assert config["algorithm"] == name.split("_")[1] and config["curriculum"]["total_stages"] == 1
        assert config["pretrained"]["model"] == str(testbed_pipe_dir)
        evals = [json.loads(line) for line in (runs / name / "eval.jsonl").read_text().splitlines()]
        assert [e["after_stage"] for e in evals] == [-1, 0]
        assert set(evals[0]["verifier"]) == {"single", "count", "relation", "all"}
        for e in evals:  # per-image strict outcomes, the pairing of strict_gain
            assert len(e["verifier_strict"]) == e["verifier"]["all"]["n"] == e["n"]
            assert sum(e["verifier_strict"]) / e["n"] == pytest.approx(e["verifier"]["all"]["strict"])
    results = json.loads((out / "study.json").read_text())
    assert set(results["runs"]) == {"srrl/0", "ddpo/0"}
    assert results["runs"]["srrl/0"]["base"] == results["runs"]["ddpo/0"]["base"]  # same untrained model
    assert set(results["summary"]) == {"base model", "srrl", "ddpo"}  # (study.json has sorted keys)
    for entry in results["summary"].values():
        assert entry["seeds"] == 1
        for f in FAMILIES:
            mean, stderr = entry[f]
            assert 0.0 <= mean <= 1.0 and stderr == 0.0
    text = (out / "study.md").read_text()
    assert "| | single (n=1) | count (n=1) | relation (n=1) | all (n=3) |" in text
    for label in ("base model", "srrl", "ddpo"):
        assert sum(line.startswith(f"| {label} |") for line in text.splitlines()) == (2 if label == "base model" else 3)
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"

    # a second call reuses both finished runs: no training subprocess, no new run directory
    before = sorted(p.name for p in runs.iterdir())
    (out / "study.md").unlink()

    def no_subprocess(*a, **k):
        raise AssertionError("finished runs must be reused")

    monkeypatch.setattr(testbed.study.subprocess, "run", no_subprocess)
    start = time.perf_counter()
    testbed.study.main(argv)
    assert time.perf_counter() - start < 10
    assert sorted(p.name for p in runs.iterdir()) == before
    again = json.loads((out / "study.json").read_text())
    assert again["summary"] == results["summary"] and (out / "study.md").read_text() == text
    assert not math.isnan(again["summary"]["srrl"]["all"][0])


def test_docs_quote_the_committed_study_table():
    """docs/testbed.md's summary of the study quotes docs/study.md (written by `python -m testbed.study --preset
    testbed`): every "mean ± s.e. %" it states is a cell of the study's table."""
    import re

    root = Path(__file__).resolve().parents[1]
    study = root / "docs" / "study.md"
    if not study.is_file():
        pytest.skip("docs/study.md not generated")
    table = "\n".join(line for line in study.read_text().splitlines() if line.startswith("|"))
    text = (root / "docs" / "testbed.md").read_text()
    summary = text[text.index("**What it shows.**"):].split("\n\n")[0]
    quoted = re.findall(r"(\d+\.\d ± \d+\.\d) %", summary)
    assert len(quoted) >= 3 and all(q in table for q in quoted), quoted
    assert "docs/testbed.md" in (root / "README.md").read_text()


def test_learning_curve_points_count_images_and_unet_rows_and_pair_with_the_base(tmp_path):
    run = tmp_path / "srrl_0"
    run.mkdir()
    config = {"curriculum": {"total_stages": 2}, "sample": {"batch_size": 2, "num_batches_per_epoch": 3},
              "split_time": 4}
    (run / "config.json").write_text(json.dumps(config))
    evals = [{"after_stage": -1, "verifier": verifier({f: 0.5 for f in FAMILIES}), "verifier_strict": [0, 1, 0, 1]},
             {"after_stage": 0, "verifier": verifier({f: 0.75 for f in FAMILIES}), "verifier_strict": [1, 1, 0, 1]},
             {"after_stage": 1, "verifier": verifier({f: 1.0 for f in FAMILIES}), "verifier_strict": [1, 1, 1, 1]}]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    metrics = [{"stage": 0, "time_stage_s": 1.0, "unet_rows": 100}, {"stage": 1, "time_stage_s": 1.0, "unet_rows": 50}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    points = collect({("srrl", 0): run})["runs"]["srrl/0"]["points"]
    assert [(p["stage"], p["images"], p["unet_rows"]) for p in points] == [(0, 0, 0), (1, 24, 100), (2, 48, 150)]
    assert [p["change"] for p in points] == [0.0, 0.25, 0.5]
    assert points[2]["change_se"] == pytest.approx(float(torch.tensor([1.0, 0, 1, 0]).std() / 2))
    text = markdown(collect({("srrl", 0): run}), "cmd", {"all": 4})
    assert "| srrl | seed 0: +50.0 ± 28.9 |" in text
