"""Worker for the kill -9 test of test_reliability.py: ``python tests/fault_run.py PIPE_DIR TMP [RESUME_DIR]``.

Runs the fast tiny config (2 stages, an evaluation after each) in TMP, resuming RESUME_DIR when given; the
environment's ``SRRL_FAILPOINT`` (srrl/faults.py) says where the process kills itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from srrl.trainer import train  # noqa: E402
from tests.conftest import fast_config  # noqa: E402


def main() -> None:
    pipe_dir, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    resume = sys.argv[3] if len(sys.argv) > 3 else ""
    train(fast_config(pipe_dir, tmp, **{"train.gradient_accumulation_steps": 2, "resume_from": resume,
                                        "sample.merge_lora": True}))


if __name__ == "__main__":
    main()
