#!/usr/bin/env bash
# SRRL on Stable Diffusion v1.4 with the published hyper-parameters (docs/algorithm.md §5), all stages in one process.
# Edit the variables below (or set them in the environment: BatchCnt=8 bash train.sh), and pass any other
# --config.FIELD=VALUE flags after the script name:  bash train.sh --config.sample.resolution=512
set -euo pipefail
cd "$(dirname "$0")"

SavePath=${SavePath:-logs}                     # run directories go to $SavePath/$ExpName
ExpName=${ExpName:-srrl_sd14}                  # run name
# Other prompts: set PromptFile / TestPromptFile (they become --config.prompt_file / --config.eval.prompt_file), e.g.
# the original code's default: PromptFile=config/prompt/template1_train.json TestPromptFile=config/prompt/template1_test.json bash train.sh
PromptFile=${PromptFile:-config/prompt/physics_train.json}  # training prompts (JSON list)
TestPromptFile=${TestPromptFile:-config/prompt/physics_test.json}  # held-out prompts for evaluation
Seed=${Seed:-300}                              # base seed (stage s uses Seed + s mod StageCnt)
Total_StageCnt=${Total_StageCnt:-50}           # stages in the run
StageCnt=${StageCnt:-5}                        # curriculum cycle length
SplitStepLeft=${SplitStepLeft:-1}              # smallest split step
SplitStepRight=${SplitStepRight:-20}           # largest split step
SplitTime=${SplitTime:-5}                      # children per fork
BatchCnt=${BatchCnt:-32}                       # prompt batches per stage (sample.num_batches_per_epoch)
BatchSize=${BatchSize:-1}                      # prompts per batch
TrainEpoch=${TrainEpoch:-2}                    # PPO epochs per stage
AccStep=${AccStep:-64}                         # gradient accumulation (samples, times the trained steps)
LR=${LR:-1e-4}                                 # learning rate
ModelVersion=${ModelVersion:-CompVis/stable-diffusion-v1-4}  # base model (hub id or local folder)
NumStep=${NumStep:-20}                         # DDIM steps
History_Cnt=${History_Cnt:-8}                  # stages of reward history per prompt
PosThreshold=${PosThreshold:-0.5}              # positive selection threshold on z
NegThreshold=${NegThreshold:--0.5}             # negative selection threshold on z
Reward=${Reward:-clip_score}                   # reward name (see rewards/rewards.py)
MixedPrecision=${MixedPrecision:-fp16}         # no / fp16 / bf16
NumProcesses=${NumProcesses:-1}                # processes (GPUs) for accelerate
AccelerateConfig=${AccelerateConfig:-}         # optional accelerate config file
Script=${Script:-train.py}                     # entry point (train_xl.sh sets train_xl.py)
Preset=${Preset:-sd14}                         # config preset (train_xl.sh sets sdxl)

launch=(accelerate launch --num_processes "$NumProcesses" --mixed_precision "$MixedPrecision")
[[ -n "$AccelerateConfig" ]] && launch=(accelerate launch --config_file "$AccelerateConfig")

"${launch[@]}" "$Script" \
  --config "config/stage_process.py:$Preset" \
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
  --config.select.history_cnt="$History_Cnt" \
  --config.select.pos_threshold="$PosThreshold" \
  --config.select.neg_threshold="$NegThreshold" \
  --config.reward.fn="$Reward" \
  --config.mixed_precision="$MixedPrecision" \
  "$@"
