"""Nothing lost, nothing poisoned: non-finite steps and rewards, run-directory ownership, resume checks and
fallbacks, stale temporaries, permissions, strict JSON."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import srrl.trainer
from srrl import rundir, runlock
from srrl.errors import ConfigError, LoadError, TrainingError
from srrl.trainer import SRRLTrainer, train
from tests.conftest import fast_config

ROOT = Path(__file__).resolve().parent.parent
LORA = "pytorch_lora_weights.safetensors"


def strict_records(path: Path) -> list[dict]:
    """JSONL parsed by a strict parser (NaN / Infinity refused)."""
    def refuse(name: str):
        raise ValueError(f"non-strict JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def lora_of(trainer: SRRLTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.denoiser.named_parameters() if v.requires_grad}


def test_nonfinite_steps_are_skipped_restored_and_stop_the_run(tiny_pipe_dir, tmp_path, monkeypatch):
    """Every AdamW step leaves an infinite LoRA weight (as an overflowing learning rate would): each step is undone
    (weights and optimizer state), counted, and the third in a row stops the run with a TrainingError."""
    config = fast_config(tiny_pipe_dir, tmp_path, **{"eval.every": 0, "select.pos_threshold": 0.0,
                                                      "select.neg_threshold": 0.0, "curriculum.total_stages": 4})
    trainer = SRRLTrainer(config)
    step = trainer.optimizer.step

    def overflowing_step(*args, **kwargs):
        step(*args, **kwargs)
        with torch.no_grad():
            trainer.params[0].view(-1)[0] = float("inf")

    monkeypatch.setattr(trainer.optimizer, "step", overflowing_step)
    before = lora_of(trainer)
    with pytest.raises(TrainingError, match="3 optimizer steps in a row"):
        trainer.run()
    after = lora_of(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not trainer.optimizer.state_dict()["state"]  # AdamW's moments put back as they were (none)
    assert trainer.step_guard.counts.consecutive == 3
    for ckpt in rundir.list_checkpoints(trainer.run_dir):
        assert all(bool(torch.isfinite(v).all()) for v in load_file(str(ckpt / LORA)).values())


def test_a_nonfinite_gradient_norm_skips_only_that_step(tiny_pipe_dir, tmp_path, monkeypatch):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"curriculum.total_stages": 1, "eval.every": 0,
                                                      "select.pos_threshold": 0.0, "select.neg_threshold": 0.0})
    trainer = SRRLTrainer(config)
    clip, calls = trainer.accelerator.clip_grad_norm_, []

    def nan_first(params, max_norm):
        calls.append(1)
        norm = clip(params, max_norm)
        return torch.tensor(float("nan")) if len(calls) == 1 else norm

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", nan_first)
    trainer.run()
    (m,) = strict_records(trainer.run_dir / "metrics.jsonl")
    assert m["skipped_steps"] == 1 and len(calls) >= 2 and math.isfinite(m["grad_norm"])


def test_nonfinite_rewards_are_counted_kept_out_and_json_stays_strict(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"curriculum.total_stages": 1, "eval.every": 0})
    trainer = SRRLTrainer(config)
    reward = trainer.reward_fn

    def poisoned(images, prompts):
        scores = reward(images, prompts).clone()
        scores[0], scores[4] = float("nan"), float("inf")
        return scores

    trainer.reward_fn = poisoned
    trainer.run()
    (m,) = strict_records(trainer.run_dir / "metrics.jsonl")
    assert m["nonfinite_rewards"] == 2 and math.isfinite(m["reward_mean"])
    history = json.loads((trainer.run_dir / "history.json").read_text(), parse_constant=float.__call__)
    scores = [x for entries in history.values() for _, stage_scores in entries for x in stage_scores]
    assert len(scores) == 12 - 2 and all(math.isfinite(x) for x in scores)


def test_strict_json_writes_null_for_nonfinite(tmp_path):
    rundir.write_jsonl(tmp_path / "m.jsonl", [{"a": float("nan"), "b": [1.0, float("inf")], "c": 2}])
    assert strict_records(tmp_path / "m.jsonl") == [{"a": None, "b": [1.0, None], "c": 2}]


def test_partial_last_jsonl_line_is_dropped_and_a_bad_middle_line_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": 0}\n{"stage": 1}\n{"sta')
    assert rundir.read_jsonl(path) == [{"stage": 0}, {"stage": 1}]
    path.write_text('{"stage": 0}\nnot json\n{"stage": 2}\n')
    with pytest.raises(LoadError, match="line 2"):
        rundir.read_jsonl(path)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        rundir.write_json(tmp_path / "a.json", {"x": 1})
        made = rundir.atomic_dir(tmp_path / "d", lambda d: (d / "f").write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(made.stat().st_mode) == 0o755


HOLD = "import sys, time; from pathlib import Path; from srrl import runlock; l = runlock.{}; print(l.run_dir, " \
       "flush=True); time.sleep(60)"


def _holder(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the lock is held from here on
    return proc


def test_run_directory_is_owned_by_one_process_and_a_dead_owner_releases_it(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    proc = _holder(HOLD.format(f"claim_existing(Path({str(run)!r}))"))
    try:
        with pytest.raises(LoadError, match=f"in use by process {proc.pid}"):
            runlock.claim_existing(run)
        fresh = runlock.claim_fresh(tmp_path / "runs", "x")  # the held, empty directory is not taken
        assert fresh.run_dir.name == "x_1"
    finally:
        proc.kill()
        proc.wait()
    runlock.claim_existing(run).release()  # the kill dropped the lock: taken over


def test_two_fresh_runs_started_together_get_two_directories(tmp_path):
    code = HOLD.format(f"claim_fresh(Path({str(tmp_path)!r}), 'same')")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        dirs = {Path(p.stdout.readline().strip()).name for p in procs}
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert dirs == {"same", "same_1", "same_2"}


def test_a_second_trainer_on_a_running_directory_stops_in_one_line(tiny_pipe_dir, tmp_path):
    first = SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, **{"eval.every": 0}))
    with pytest.raises(LoadError, match="in use by process"):
        SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, resume_from=str(first.run_dir)))
    second = SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, **{"eval.every": 0}))
    assert second.run_dir.name == "t_1" and first.run_dir.name == "t"


def test_unwritable_save_path_is_one_line(tiny_pipe_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LoadError, match="cannot create the run directory"):
        SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, save_path=str(blocker / "runs")))


@pytest.fixture(scope="module")
def two_stage_run(tiny_pipe_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reliable")
    return train(fast_config(tiny_pipe_dir, tmp, **{"eval.every": 0}))


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def test_resume_refuses_fixed_changes_and_lists_the_others(tiny_pipe_dir, tmp_path, two_stage_run):
    run = _copy(two_stage_run, tmp_path / "copy")
    for field, value in [("seed", 5), ("lora_rank", 8), ("sample.resolution", 32), ("curriculum.stage_cnt", 3)]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, resume_from=str(run), **{"eval.every": 0,
                                                                                     field: value}))
    more = fast_config(tiny_pipe_dir, tmp_path, resume_from=str(run), **{"eval.every": 0,
                                                                         "curriculum.total_stages": 3,
                                                                         "train.learning_rate": 2e-2})
    trainer = SRRLTrainer(more)
    assert trainer.start_stage == 2
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["curriculum"]["total_stages"] == 3 and recorded["train"]["learning_rate"] == 2e-2


def test_resume_falls_back_past_damaged_checkpoints_and_clears_leftovers(tiny_pipe_dir, tmp_path, two_stage_run):
    """The newest checkpoint damaged in each way in turn: resume uses stage_000 and re-runs stage 1 to the same
    weights as the uninterrupted run."""
    want = load_file(str(two_stage_run / "checkpoints" / "stage_001" / LORA))
    damage = {
        "truncated LoRA": lambda c: (c / LORA).write_bytes((c / LORA).read_bytes()[:100]),
        "missing tensors": lambda c: save_file(dict(list(load_file(str(c / LORA)).items())[:3]), str(c / LORA)),
        "truncated optimizer": lambda c: (c / "optimizer.safetensors").write_bytes(b"\0" * 9),
        "bad state.json": lambda c: (c / "state.json").write_text('{"stage": 1, '),
    }
    for k, (name, hurt) in enumerate(damage.items()):
        run = _copy(two_stage_run, tmp_path / f"r{k}")
        hurt(run / "checkpoints" / "stage_001")
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"stage": 1, "rew')
        (run / "checkpoints" / ".tmp_abc").mkdir()
        (run / ".curves.png.x1.tmp").write_text("")
        trainer = SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, resume_from=str(run), **{"eval.every": 0}))
        assert trainer.start_stage == 1, name
        trainer.run()
        got = load_file(str(run / "checkpoints" / "stage_001" / LORA))
        assert all(torch.equal(got[key], want[key]) for key in want), name
        assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp_*")), name
        assert [m["stage"] for m in strict_records(run / "metrics.jsonl")] == [0, 1], name


def test_a_full_disk_at_checkpoint_time_is_one_line_and_keeps_the_previous(tiny_pipe_dir, tmp_path, monkeypatch):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"eval.every": 0})
    original, calls = srrl.trainer.save_lora, []

    def full_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args)

    monkeypatch.setattr(srrl.trainer, "save_lora", full_on_second)
    with pytest.raises(TrainingError, match="No space left on device"):
        train(config)
    run = Path(config.save_path) / config.exp_name
    assert [c.name for c in rundir.list_checkpoints(run)] == ["stage_000"]
    assert not list((run / "checkpoints").glob(".tmp_*"))


KILL_POINTS = ["after_sampling:1", "checkpoint_half_written:1", "checkpoint_published:0", "after_metrics:0"]


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights(tiny_pipe_dir, tmp_path):
    """A short run killed with SIGKILL at each failpoint (srrl/faults.py), then resumed: final LoRA, optimizer
    and pending-gradient files equal an uninterrupted run's bit for bit, and nothing temporary remains."""
    def run(name: str, point: str = "", resume: str = "") -> subprocess.CompletedProcess:
        args = [sys.executable, str(ROOT / "tests" / "fault_run.py"), str(tiny_pipe_dir), str(tmp_path / name)]
        env = {**os.environ, "SRRL_FAILPOINT": point, "OMP_NUM_THREADS": "1"}
        return subprocess.run(args + ([resume] if resume else []), env=env, capture_output=True, text=True,
                              timeout=300)

    start = time.monotonic()
    full = run("full")
    assert full.returncode == 0, full.stderr[-2000:]
    want = tmp_path / "full" / "runs" / "t" / "checkpoints" / "stage_001"
    for k, point in enumerate(KILL_POINTS):
        killed = run(f"k{k}", point)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        run_dir = tmp_path / f"k{k}" / "runs" / "t"
        resumed = run(f"k{k}", resume=str(run_dir))
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        got = run_dir / "checkpoints" / "stage_001"
        for name in (LORA, "optimizer.safetensors", "accumulated_grads.safetensors"):
            a, b = load_file(str(got / name)), load_file(str(want / name))
            assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a), (point, name)
        assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".tmp_*")), point
    assert time.monotonic() - start < 600
