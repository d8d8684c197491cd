#!/usr/bin/env bash
# SRRL on SDXL base 1.0 with the published hyper-parameters (docs/algorithm.md §4-5), all stages in one process.
# Every variable of train.sh applies (set it here or in the environment); these are the SDXL defaults:
#   bash train_xl.sh --config.sample.resolution=768
set -euo pipefail
cd "$(dirname "$0")"

export ModelVersion=${ModelVersion:-stabilityai/stable-diffusion-xl-base-1.0}  # base model (hub id or folder)
export ExpName=${ExpName:-srrl_sdxl}                                            # run name
export Script=train_xl.py                                                       # the SDXL entry point
export Preset=sdxl                                                              # 1024 px, published values

exec bash train.sh "$@"
