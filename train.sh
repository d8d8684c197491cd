#!/usr/bin/env bash
# SRRL on Stable Diffusion v1.4 with the published hyper-parameters (SPEC §5), all stages in one process.
# Edit the variables below, or pass extra --config.FIELD=VALUE flags after the script name:
#   bash train.sh --config.sample.num_batches_per_epoch=8
set -euo pipefail
cd "$(dirname "$0")"

SavePath=logs                                  # run directories go to $SavePath/$ExpName
ExpName=srrl_sd14                              # run name
PromptFile=config/prompt/physics_train.json    # training prompts (JSON list)
TestPromptFile=config/prompt/physics_test.json # held-out prompts for evaluation
Seed=300                                       # base seed (stage s uses Seed + s mod StageCnt)
Total_StageCnt=50                              # stages in the run
StageCnt=5                                     # curriculum cycle length
SplitStepLeft=1                                # smallest split step
SplitStepRight=20                              # largest split step
SplitTime=5                                    # children per fork
BatchCnt=32                                    # prompt batches per stage (sample.num_batches_per_epoch)
BatchSize=1                                    # prompts per batch
TrainEpoch=2                                   # PPO epochs per stage
AccStep=64                                     # gradient accumulation (samples, times the trained steps)
LR=1e-4                                        # learning rate
ModelVersion=CompVis/stable-diffusion-v1-4     # base model (hub id or local folder)
NumStep=20                                     # DDIM steps
History_Cnt=8                                  # stages of reward history per prompt
PosThreshold=0.5                               # positive selection threshold on z
NegThreshold=-0.5                              # negative selection threshold on z
Reward=clip_score                              # reward name (see rewards/rewards.py)
MixedPrecision=fp16                            # no / fp16 / bf16
NumProcesses=${NumProcesses:-1}                # processes (GPUs) for accelerate
AccelerateConfig=${AccelerateConfig:-}         # optional accelerate config file

launch=(accelerate launch --num_processes "$NumProcesses" --mixed_precision "$MixedPrecision")
[[ -n "$AccelerateConfig" ]] && launch=(accelerate launch --config_file "$AccelerateConfig")

"${launch[@]}" train.py \
  --config config/stage_process.py:sd14 \
  --config.save_path="$SavePath" \
  --config.exp_name="$ExpName" \
  --config.prompt_file="$PromptFile" \
  --config.eval.prompt_file="$TestPromptFile" \
  --config.seed="$Seed" \
  --config.curriculum.total_stages="$Total_StageCnt" \
  --config.curriculum.stage_cnt="$StageCnt" \
  --config.curriculum.split_left="$SplitStepLeft" \
  --config.curriculum.split_right="$SplitStepRight" \
  --config.split_time="$SplitTime" \
  --config.sample.num_batches_per_epoch="$BatchCnt" \
  --config.sample.batch_size="$BatchSize" \
  --config.train.num_epochs="$TrainEpoch" \
  --config.train.gradient_accumulation_steps="$AccStep" \
  --config.train.learning_rate="$LR" \
  --config.pretrained.model="$ModelVersion" \
  --config.sample.num_steps="$NumStep" \
  --config.eval.history_cnt="$History_Cnt" \
  --config.eval.pos_threshold="$PosThreshold" \
  --config.eval.neg_threshold="$NegThreshold" \
  --config.reward.fn="$Reward" \
  --config.mixed_precision="$MixedPrecision" \
  "$@"
