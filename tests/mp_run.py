"""Worker for test_multiprocess.py: ``torchrun --nproc_per_node N tests/mp_run.py PIPE_DIR OUT_DIR TRAIN_BATCH``.

Runs the fast tiny config (``train.batch_size`` = TRAIN_BATCH per process) and has every rank dump its final
LoRA weights to OUT_DIR/rank<r>.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from srrl.models import lora_state_dict  # noqa: E402
from srrl.trainer import SRRLTrainer  # noqa: E402
from tests.conftest import fast_config  # noqa: E402


def main() -> None:
    pipe_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    # merge_lora, beta2 0 (rows without advantage skip the UNet; a rank may keep a single zero row), several
    # timesteps per training call (calls end at optimizer steps: no_sync/sync as with one) and channels-last under DDP
    config = fast_config(pipe_dir, out_dir, **{"train.gradient_accumulation_steps": 2, "eval.every": 2,
                                               "train.batch_size": int(sys.argv[3]), "sample.merge_lora": True,
                                               "train.beta2": 0.0, "train.timesteps_per_call": 3,
                                               "channels_last": True, "lora_target_modules": "to_q,to_v,conv1"})
    trainer = SRRLTrainer(config)
    trainer.run()
    unet = trainer.accelerator.unwrap_model(trainer.network)
    save_file(lora_state_dict(unet), str(out_dir / f"rank{trainer.accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    main()
