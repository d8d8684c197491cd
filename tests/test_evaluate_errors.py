"""Each bad input of ``evaluate.py`` ends the process with exit code 2 and one ERROR line, no traceback.

Importing evaluate.py's dependencies takes ~7 s, so the cases do not each start a Python: one helper process
imports them once and forks a child per case that runs ``evaluate.py`` as ``__main__`` with its own argv,
stdout/stderr (files) and exit status, reporting an uncaught exception as the interpreter does (traceback,
exit 1). One case also runs through a real ``python evaluate.py`` process.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import evaluate as ev
from tests.conftest import fast_config

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "checkpoints/stage_000/pytorch_lora_weights.safetensors"

# The helper process: reads [script, argv, output prefix] lines, forks a child per line that runs the script,
# answers the child's exit code.
FORK_RUNNER = r"""
import json, os, runpy, signal, sys, traceback
import evaluate  # noqa: F401  (the slow imports, done once; evaluate.py defines its flags only as __main__)
for line in sys.stdin:
    script, args, prefix = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.alarm(120)
        for fd, path in ((0, os.devnull), (1, prefix + ".out"), (2, prefix + ".err")):
            os.dup2(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY), fd)
        sys.argv, code = [script, *args], 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (stop.code is not None)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(int(code))
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Runner:
    """Runs ``evaluate.py ARGS`` (or another ``script``) in a child of the helper process; ``(exit code, stderr)``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.count = folder, 0
        self.process = subprocess.Popen([sys.executable, "-c", FORK_RUNNER], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def __call__(self, *args: str, script: Path = ROOT / "evaluate.py") -> tuple[int, str]:
        self.count += 1
        prefix = self.folder / f"case{self.count}"
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([str(script), list(args), str(prefix)]) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the helper process died"
        return int(answer), Path(f"{prefix}.err").read_text()


@pytest.fixture(scope="module")
def evaluate_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    runner = Runner(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.process.stdin.close()
    runner.process.wait(timeout=30)


@pytest.fixture(scope="module")
def made_run(tiny_pipe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory made by hand: config.json and one checkpoint (stage 0) of the freshly adapted UNet."""
    from diffusers import StableDiffusionPipeline

    from srrl.families.sd import load_sd_model
    from srrl.models import save_lora

    run = tmp_path_factory.mktemp("made_run")
    config = fast_config(tiny_pipe_dir, run / "setup", **{"sample.num_steps": 2})
    (run / "config.json").write_text(config.to_json_best_effort())
    stage = run / "checkpoints" / "stage_000"
    stage.mkdir(parents=True)
    save_lora(StableDiffusionPipeline, load_sd_model(config, torch.device("cpu"), torch.float32).denoiser, stage)
    (stage / "state.json").write_text(json.dumps({"stage": 0}))
    return run


def copy_run(run: Path, into: Path, change: Callable[[Path], None]) -> Path:
    """A copy of ``run`` in ``into`` changed by ``change(copy)``."""
    copy = into / "run"
    shutil.copytree(run, copy)
    change(copy)
    return copy


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def poison(path: Path) -> None:
    """One value of the LoRA file made NaN (a well-formed file the model-free check accepts)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = math.nan
    save_file(tensors, str(path))


def without(field: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        del config[field]
        (run / "config.json").write_text(json.dumps(config))

    return change


RUN_CHANGES = {
    "lora_empty": (lambda run: truncate(run / WEIGHTS, 0.0), "is unreadable"),
    "lora_half": (lambda run: truncate(run / WEIGHTS, 0.5), "is unreadable"),
    "lora_nan": (lambda run: poison(run / WEIGHTS), "holds non-finite values"),
    "config_not_json": (lambda run: (run / "config.json").write_text('{"sample": {'), "is not valid JSON"),
    "config_not_object": (lambda run: (run / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    "config_lacks_fields": (without("sample"), "lacks sample.resolution, sample.num_steps"),
}
FLAG_CASES = {
    "stages_text": (["--stages=abc"], "'all', 'last' or comma-separated stage numbers"),
    "stages_absent": (["--stages=0,99"], "no checkpoint for stage 99; its checkpoints are stages 0"),
    "batch_size_0": (["--batch_size=0"], "--batch_size=0 is not allowed; expected a positive integer"),
    "images_negative": (["--num_images_per_prompt=-1"], "--num_images_per_prompt=-1 is not allowed"),
    "images_0": (["--num_images_per_prompt=0"], "--num_images_per_prompt=0 is not allowed"),
    "num_steps_0": (["--num_steps=0"], "--num_steps=0 is not allowed; expected a positive integer"),
    "seed_negative": (["--seed=-3"], "--seed=-3 is not allowed; expected an integer >= 0"),
    "guidance_negative": (["--guidance_scale=-1"], "--guidance_scale=-1.0 is not allowed"),
    "guidance_nan": (["--guidance_scale=nan"], "expected a finite number >= 0"),
    "device_unknown": (["--device=tpu9"], "--device='tpu9' is not a device name; available devices: cpu"),
    "reward_option": (["--reward_option=jpeg_quality"], "--reward_option: reward option expects KEY=VALUE"),
    "reward_unknown": (["--rewards=no_such_reward"], "unknown reward 'no_such_reward'"),
}


def assert_one_error_line(code: int, stderr: str, expected: str) -> str:
    """Exit code 2, no traceback, and exactly one ERROR line: the last line, holding ``expected``."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    assert expected in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", list(RUN_CHANGES))
def test_broken_run_dir_is_one_line(case: str, made_run: Path, evaluate_cli: Runner, tmp_path: Path) -> None:
    change, expected = RUN_CHANGES[case]
    run = copy_run(made_run, tmp_path, change)
    out = tmp_path / "out"
    code, stderr = evaluate_cli(f"--run_dir={run}", f"--out={out}", "--device=cpu", "--rewards=brightness")
    line = assert_one_error_line(code, stderr, expected)
    assert str(run / ("config.json" if case.startswith("config") else WEIGHTS)) in line
    assert not list(out.glob("images/*/*.png"))  # refused before any image (the base column's too)
    assert case == "lora_nan" or not out.exists()  # the others before any model loads


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag_is_one_line(case: str, made_run: Path, evaluate_cli: Runner, tmp_path: Path) -> None:
    args, expected = FLAG_CASES[case]
    out = tmp_path / "out"
    code, stderr = evaluate_cli(f"--run_dir={made_run}", f"--out={out}", "--device=cpu", *args)
    assert_one_error_line(code, stderr, expected)
    assert not list(out.glob("images/*/*.png"))


def test_cuda_without_cuda_is_one_line(made_run: Path, evaluate_cli: Runner, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, stderr = evaluate_cli(f"--run_dir={made_run}", f"--out={tmp_path / 'out'}", "--device=cuda")
    assert_one_error_line(code, stderr, "--device='cuda': CUDA is not available on this machine")
    assert "available devices: cpu" in stderr


def test_real_process_bad_flag_is_one_line(made_run: Path, tmp_path: Path) -> None:
    """The same contract through ``python evaluate.py`` itself (not a forked child)."""
    cli = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"--run_dir={made_run}", "--stages=99",
                          f"--out={tmp_path / 'out'}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert_one_error_line(cli.returncode, cli.stderr, "no checkpoint for stage 99; its checkpoints are stages 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("body", "code", "traceback"), [
    ("raise KeyError(sys.argv[1])", 1, True), ("sys.exit(3)", 3, False), ("print('x', file=sys.stderr)", 0, False),
])
def test_runner_exits_as_python_does(body: str, code: int, traceback: bool, evaluate_cli: Runner,
                                     tmp_path: Path) -> None:
    """The fork runner is a faithful stand-in for a Python process: an uncaught error shows its traceback and
    exits 1, ``sys.exit`` keeps its code, and stderr is the child's own."""
    script = tmp_path / "script.py"
    script.write_text(f"import sys\n{body}\n")
    got, stderr = evaluate_cli("argument", script=script)
    assert got == code and ("Traceback" in stderr) == traceback and ("KeyError: 'argument'" in stderr) == traceback


def index_rows(page: str) -> list[list[str]]:
    """The columns shown in bold, row by row, of an index.html."""
    rows = page.split('<tr><td class="p">')[1:]
    return [re.findall(r'alt="(\w+) \d+"><div class="best">', row) for row in rows]


def test_index_bolds_only_strict_winners(tmp_path: Path) -> None:
    scores = {"base": [1.0, 0.5, 0.2, 0.3, 0.0], "a": [1.0, 0.9, 0.2, math.nan, 0.1],
              "b": [0.0, 0.9, 0.2, 0.1, 0.7]}
    summary = {"mean": 0.5, "std": 0.1, "stderr": 0.05, "n": 5}
    metrics = {"metrics": {c: {"r": summary} for c in scores}, "rewards": ["r"],
               "scores": {c: {"r": v} for c, v in scores.items()}, "prompts": [f"prompt {i}" for i in range(5)],
               "model": "m", "num_steps": 2, "guidance_scale": 1.0, "seed": 0}
    ev.write_index(tmp_path / "index.html", metrics, 1)
    # a tie for the best bolds all tied (above the rest); a tie of all columns bolds none; NaN never wins
    assert index_rows((tmp_path / "index.html").read_text()) == [["base", "a"], ["a", "b"], [], ["base"], ["b"]]
    alone = {**metrics, "metrics": {"base": metrics["metrics"]["base"]}, "scores": {"base": metrics["scores"]["base"]}}
    ev.write_index(tmp_path / "alone.html", alone, 1)
    assert index_rows((tmp_path / "alone.html").read_text()) == [[]] * 5
    assert ev.best_columns({"a": math.nan, "b": math.nan}) == set() and ev.best_columns({}) == set()
