"""Hyper-parameters of SRRL runs. Pick a preset with ``--config config/stage_process.py:NAME``.

Presets: ``sd14`` (default; the published SD v1.4 values of docs/algorithm.md §5), ``tiny`` (the Quickstart: the shapes-world
testbed model with the exact verifier), ``testbed`` (the study's runs), ``tiny_sd`` (brightness on the 1 M-parameter
model), ``bench`` (the reference workload of ``bench/stage_bench.py``), ``sdxl``, ``tiny_xl``, ``sd35`` (SD3.5 Medium),
``tiny_sd3``, ``flux`` (FLUX.1-dev), ``flux_schnell``, ``tiny_flux``. Override any field with
``--config.FIELD=VALUE``.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "config" / "prompt"
PRESETS = ("sd14", "tiny", "testbed", "tiny_sd", "bench", "sdxl", "tiny_xl", "sd35", "tiny_sd3", "flux",
           "flux_schnell", "tiny_flux")
SD3_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # joint attention (Flow-GRPO)
FLUX_LORA_TARGETS = SD3_LORA_TARGETS  # FLUX: the double blocks' joint attention and the single blocks' attention


def base() -> ml_collections.ConfigDict:
    """The published SD v1.4 configuration (docs/algorithm.md §5)."""
    c = ml_collections.ConfigDict()
    c.exp_name = "srrl_sd14"  # run name: the run directory is <save_path>/<exp_name>
    c.family = "sd"  # model family (srrl/families/): "sd" (SD v1.x/v2.x), "sdxl", "sd3" (SD3 / SD3.5) or "flux"
    c.algorithm = "srrl"  # srrl, b2diffurl (no reflection), ddpo or grpo (no fork, no selection): srrl/algorithms.py
    c.save_path = "logs"  # parent folder of run directories
    c.seed = 300  # base seed; stage s uses seed + (s mod curriculum.stage_cnt)
    c.prompt_file = str(PROMPTS / "physics_train.json")  # JSON list of training prompts
    c.prompt = ""  # a single fixed prompt; overrides prompt_file when non-empty
    c.prompt_random_choose = 1  # 1: draw prompts uniformly at random (seeded per stage); 0: round-robin
    c.mixed_precision = "fp16"  # "no", "fp16" or "bf16" (frozen weights in this dtype; LoRA stays fp32)
    c.allow_tf32 = True  # allow TF32 matmuls on Ampere+ GPUs
    c.channels_last = False  # UNet convolution weights in channels-last layout (faster convolutions on some devices)
    c.compile_denoiser = False  # torch.compile the UNet's calls (GPU speed; results change at float rounding level)
    c.use_lora = True  # train LoRA adapters on the UNet (the only supported mode); see lora_target_modules
    c.lora_rank = 4  # LoRA rank (and alpha)
    c.lora_target_modules = "to_q,to_k,to_v,to_out.0"  # comma-separated UNet module names (suffixes) given LoRA
    c.resume_from = ""  # a run directory to continue from its last checkpoint
    c.split_step = 0  # 0: the curriculum decides; 1..sample.num_steps: a fixed split step for every stage
    c.split_time = 5  # children per fork
    c.resample_num = -1  # -1: the curriculum decides; >= 0: a fixed number of reflection rounds

    c.pretrained = ml_collections.ConfigDict()
    c.pretrained.model = "CompVis/stable-diffusion-v1-4"  # hub id or local folder of a diffusers pipeline
    c.pretrained.revision = ""  # hub revision ("" = default branch)
    c.pretrained.text_encoder_3 = True  # sd3: load the T5 encoder (False: leave it out; its tokens are zeros)
    c.pretrained.max_sequence_length = 256  # sd3, flux: T5 tokens of the prompt embedding (FLUX.1-dev: 512)

    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.total_stages = 50  # stages in the run
    c.curriculum.stage_cnt = 5  # cycle length: seeds and split steps recur every stage_cnt stages
    c.curriculum.split_left = 1  # smallest split step of a cycle
    c.curriculum.split_right = 20  # upper end of the split range (the last stage of a cycle may not reach it)

    c.reflect = ml_collections.ConfigDict()
    c.reflect.forward_guidance_scale = 3.0  # CFG of the deterministic denoising in a reflection round
    c.reflect.inverse_guidance_scale = 0.1  # CFG of the DDIM inversion in a reflection round
    c.reflect.inversion_iterations = 0  # extra denoiser calls a step that refine the inversion (0: plain inversion)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 20  # DDIM steps of every trajectory
    c.sample.eta = 1.0  # DDIM eta of the sampled (trained) trajectories
    c.sample.guidance_scale = 5.0  # CFG scale of sampling and of the log-prob recomputation in training
    c.sample.batch_size = 1  # prompts per batch
    c.sample.num_batches_per_epoch = 32  # prompt batches per stage
    c.sample.resolution = 512  # image size in pixels
    c.sample.max_micro_batch = 32  # most UNet rows per forward call (CFG doubles rows)
    c.sample.same_latent = False  # True: a prompt's split_time images share x_T also without a fork (ddpo, grpo)
    c.sample.merge_lora = False  # merge LoRA into the UNet for sampling and evaluation (faster; float-level change)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 1  # selected trajectories per training micro-step
    c.train.timesteps_per_call = 1  # kept steps of a micro-batch in one UNet call (rows x this); same gradient
    c.train.num_epochs = 2  # passes over the selected samples per stage
    c.train.gradient_accumulation_steps = 64  # samples per optimizer step (times the kept steps of each)
    c.train.flush_accumulation_at_stage_end = False  # True: step on a partial accumulation at each stage end
    c.train.learning_rate = 1e-4  # AdamW learning rate
    c.train.adam_beta1 = 0.9  # AdamW beta1
    c.train.adam_beta2 = 0.999  # AdamW beta2
    c.train.adam_weight_decay = 1e-4  # AdamW weight decay
    c.train.adam_epsilon = 1e-8  # AdamW epsilon
    c.train.max_grad_norm = 1.0  # gradient-norm clip
    c.train.ema_decay = 0.0  # >0: held-out evaluations score an EMA of the LoRA weights (srrl/ema.py); 0: off
    c.train.kl_coef = 0.0  # KL anchor to the base model (LoRA off) per trained step; 0: off (docs/algorithm.md §3g)
    c.train.gradient_checkpointing = False  # recompute UNet activations in the backward pass (less memory, slower)
    c.train.objective = "ppo"  # "ppo": clipped ratio of sampler log-probs; "awm": advantage-weighted matching;
    # "nft": DiffusionNFT's positive/negative matching against the sampling policy (docs/algorithm.md §3k)
    c.train.nft_beta = 1.0  # nft: beta of the implicit policies (the official default; 0.1 in its OCR config)
    c.train.nft_adv_clip = 5.0  # nft: advantages are clipped to +-this and mapped to r in [0, 1]
    c.train.nft_old_decay_rate = 0.001  # nft: theta_old <- eta theta_old + (1 - eta) theta, eta = rate * (stage + 1)
    c.train.nft_old_decay_cap = 0.5  # nft: ... capped at this
    c.train.clip_range = 0.1  # PPO ratio clip eps
    c.train.timestep_window = 0  # W > 0: train the first W post-fork steps; W < 0: all but the last -W; 0: all
    c.train.lr_warmup_steps = 0  # optimizer steps over which the learning rate rises linearly to its value (0: none)
    c.train.target_kl = 0.0  # > 0: end a stage's update after an optimizer step whose mean approx-KL exceeds it
    c.train.trust_probe = False  # True: after each optimizer step, the log-prob change of A>0 / A<0 rows (srrl/trust.py)
    c.train.adv_clip_max = 5.0  # advantages are clipped to [-adv_clip_max, adv_clip_max]
    c.train.beta1 = 1.0  # advantage weight of positives (z > 0)
    c.train.beta2 = 1.0  # advantage weight of negatives (z <= 0)
    c.train.save_interval = 1  # checkpoint every this many stages (and always after the last)
    c.train.num_checkpoint_limit = 5  # checkpoints kept (oldest deleted first)

    # per-prompt normalisation and selection (the original keeps these in config.eval; train.sh keeps its names)
    c.select = ml_collections.ConfigDict()
    c.select.pos_threshold = 0.5  # a group's best child is a positive if its z >= this
    c.select.positives = "best"  # "best": a group's best child past pos_threshold (the original); "all": each
    c.select.neg_threshold = -0.5  # a group's worst child is a negative if its z < this
    c.select.history_cnt = 8  # past stages pooled per prompt for normalisation
    c.select.history_window = "stage"  # "stage": the prompt's scores of the last history_cnt stages (the original);
    # "appearance": its last history_cnt appearances, however long ago (this project before 2026-12)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 5  # held-out evaluation every this many stages (and before the first and after the last); 0 disables
    c.eval.prompt_file = str(PROMPTS / "physics_test.json")  # held-out prompts (JSON list)
    c.eval.num_images_per_prompt = 2  # images per held-out prompt (fixed seeds, eta 0)
    c.eval.seed = 1234  # seed of the held-out images (the same at every evaluation)
    c.eval.eta = 0.0  # DDIM eta of the held-out images (0: deterministic; 1: the sampler the policy trains)
    c.eval.guidance_scale = 0.0  # CFG scale of the held-out images; 0: sample.guidance_scale (the policy's own)
    c.eval.verifier = False  # True: also score held-out images with the shapes-world verifier (testbed prompts)
    c.eval.dtype = ""  # UNet dtype of the held-out passes: "" (the run's), "float32", "bfloat16" or "float16"

    c.reward = ml_collections.ConfigDict()
    c.reward.fn = "clip_score"  # reward name in rewards.rewards.REWARDS
    c.reward.clip_model = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # model of clip_score (hub id or folder)
    c.reward.batch_size = 16  # images per reward-model call
    c.reward.dtype = "float32"  # dtype of the reward model
    c.reward.local_files_only = False  # True: never download reward models (also implied by HF_HUB_OFFLINE=1)
    c.reward.jpeg_quality = 95  # JPEG quality of jpeg_compressibility / jpeg_incompressibility
    c.reward.pickscore_model = "yuvalkirstain/PickScore_v1"  # model of pickscore (hub id or folder)
    c.reward.pickscore_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # tokenizer + image norm of pickscore
    c.reward.aesthetic_clip_model = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14 under the aesthetic MLP
    c.reward.aesthetic_mlp = (  # LAION aesthetic MLP weights: .pth/.safetensors file or hf://owner/repo/file
        "hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
    )
    c.reward.image_reward_model = "ImageReward-v1.0"  # ImageReward model name or a local ImageReward.pt
    c.reward.image_reward_cache = ""  # folder with ImageReward.pt + med_config.json ("" = ~/.cache/ImageReward)
    c.reward.vqa_model = "clip-flant5-xl"  # t2v_metrics VQAScore model
    c.reward.vqa_cache_dir = ""  # t2v_metrics download folder ("" = the package default)
    c.reward.hpsv2_version = "v2.1"  # HPSv2 checkpoint version: v2.0 or v2.1
    c.reward.hpsv2_checkpoint = ""  # HPSv2 checkpoint file or hf://owner/repo/file ("" = the version's default)
    c.reward.remote_url = "http://127.0.0.1:8765/score"  # score URL of `python -m rewards.server` (reward "remote")
    c.reward.remote_timeout = 120.0  # seconds per remote request
    c.reward.remote_retries = 2  # retries after a connection failure or a timeout
    c.reward.remote_dtype = "uint8"  # image encoding on the wire: uint8 (PNG-equivalent) or float32 (exact)

    c.logging = ml_collections.ConfigDict()
    c.logging.tracker = "wandb"  # "wandb" (offline without an API key), "tensorboard" or "none"
    c.logging.project = "srrl"  # tracker project name
    c.logging.log_images = True  # write images/stage_NNN.png and send the grid to the tracker
    return c


def tiny_sd() -> ml_collections.ConfigDict:
    """The embedded brightness demo: the 1 M-parameter pixel-space SD v1 pipeline, brightness reward, CPU."""
    c = base()
    c.exp_name = "srrl_tiny_sd"
    c.seed = 0
    c.mixed_precision = "no"
    c.pretrained.model = str(ROOT / "assets" / "tiny-sd")
    c.prompt_file = str(PROMPTS / "tiny_train.json")
    c.eval.prompt_file = str(PROMPTS / "tiny_test.json")
    c.curriculum.total_stages = 10
    c.curriculum.stage_cnt = 5
    c.curriculum.split_left = 1
    c.curriculum.split_right = 5  # the last half of the 10 steps: cheaper and, on this model, a steadier gain
    c.sample.num_steps = 10
    c.sample.resolution = 32
    c.sample.batch_size = 4
    c.sample.num_batches_per_epoch = 4
    c.sample.max_micro_batch = 256
    c.train.batch_size = 8
    c.train.gradient_accumulation_steps = 4
    c.train.learning_rate = 3e-3
    c.eval.every = 10  # before and after training only: each held-out pass costs as much as a stage
    c.eval.num_images_per_prompt = 12  # 120 held-out images: a standard error of ~0.007 on brightness
    c.reward.fn = "brightness"
    c.logging.tracker = "none"
    return c


def testbed() -> ml_collections.ConfigDict:
    """The shapes-world testbed of the study (testbed/study.py): the pre-trained testbed model, exact-verifier
    reward, all 312 training captions, held-out captions of all three families; the regime measured in
    docs/testbed_tuning.md (sixteenth and seventeenth rounds): advantage-weighted matching, lr 1e-3, positives
    only, 32 trajectories an optimizer step, 4 stages of 128 images; CPU minutes per run."""
    c = tiny_sd()
    c.exp_name = "srrl_testbed"
    c.pretrained.model = str(ROOT / "assets" / "testbed-sd")
    c.prompt_file = str(PROMPTS / "testbed_full_train.json")  # 312 captions of the three families
    c.eval.prompt_file = str(PROMPTS / "testbed_test.json")  # 24 held-out captions: single, count, relation
    c.eval.verifier = True  # held-out accuracy per caption family and part (eval.jsonl "verifier")
    c.train.trust_probe = True  # does each step move log-probs with the advantages? (one extra forward per step)
    c.curriculum.split_right = 10  # forks anywhere in the 10 steps: layout and count are decided early
    c.sample.guidance_scale = 4.0
    c.sample.batch_size = 16  # prompts a stage
    c.sample.num_batches_per_epoch = 1
    c.split_time = 8  # images a prompt (children of a fork under srrl / b2diffurl)
    c.train.objective = "awm"  # PPO on the sampler's log-probs moves this model little at this budget
    c.train.learning_rate = 1e-3
    c.train.beta2 = 0.0  # positives only: with negatives the positives' pull cancels
    c.train.num_epochs = 1
    c.train.gradient_accumulation_steps = 32  # 32 trajectories an optimizer step
    c.train.flush_accumulation_at_stage_end = True  # selection keeps fewer rows under srrl / b2diffurl / ddpo
    c.curriculum.total_stages = 4  # at lr 1e-3 the gain turns into a collapse after about 6 stages
    c.sample.max_micro_batch = 128  # this UNet is faster per row in calls of 128 rows than of 256 on a CPU
    c.sample.merge_lora = True  # sampling and held-out passes run the merged UNet
    c.train.timesteps_per_call = 10  # training calls of few rows are overhead-bound on a CPU; same gradient
    c.channels_last = True  # ~10% faster convolutions of this UNet on the CPU, with and without gradients
    c.eval.every = 2  # before training, after stage 2 and after the last
    c.eval.num_images_per_prompt = 32  # 24 held-out captions x 32 = 768 images, the same seeds at each evaluation
    c.eval.eta = 1.0  # score the sampler the policy trains (eta 1 is also the more accurate one at 10 steps)
    c.eval.dtype = "bfloat16"  # ~1.5x faster per UNet row where the CPU has bf16 units; float32 where it has none
    c.reward.fn = "shapes_partial"
    return c


def tiny() -> ml_collections.ConfigDict:
    """The Quickstart default: the ``testbed`` regime with the ``grpo`` preset, scored on counting captions of
    held-out colour-shape pairs (the family with headroom); CPU minutes. docs/testbed_tuning.md, seventeenth round."""
    c = testbed()
    c.exp_name = "srrl_tiny"
    c.algorithm = "grpo"  # independent images per prompt, group-normalised (srrl's forks: docs/testbed_tuning.md)
    c.eval.prompt_file = str(PROMPTS / "testbed_count_test.json")  # 8: the held-out colour-shape pairs, two and three
    c.train.flush_accumulation_at_stage_end = False  # 128 rows a stage: four full optimizer steps
    c.eval.every = 4  # before and after training (the last stage is always evaluated)
    c.eval.num_images_per_prompt = 64  # 512 held-out images, the same seeds before and after (paired); 1024 and 768
    # took a CPU without bf16 units past 5 minutes with pip
    c.train.trust_probe = False  # one extra forward per optimizer step (awm moves log-probs the right way)
    return c


def bench() -> ml_collections.ConfigDict:
    """The reference workload of bench/stage_bench.py."""
    c = tiny_sd()
    c.exp_name = "srrl_bench"
    c.sample.resolution = 64
    c.sample.num_steps = 20
    c.sample.batch_size = 1
    c.sample.num_batches_per_epoch = 8
    c.split_step = 9
    c.split_time = 5
    c.resample_num = 0
    c.train.batch_size = 1
    c.train.num_epochs = 2
    c.train.gradient_accumulation_steps = 64
    c.eval.every = 0
    c.logging.log_images = False
    return c


def sdxl() -> ml_collections.ConfigDict:
    """The published values with SDXL base 1.0 (docs/algorithm.md §4-5), 1024 px."""
    c = base()
    c.exp_name = "srrl_sdxl"
    c.family = "sdxl"
    c.pretrained.model = "stabilityai/stable-diffusion-xl-base-1.0"
    c.sample.resolution = 1024
    c.sample.max_micro_batch = 16
    c.train.gradient_checkpointing = True  # the training micro-step at 1024 px fits in less memory
    return c


def tiny_xl() -> ml_collections.ConfigDict:
    """The embedded SDXL default: a tiny random SDXL pipeline built offline and cached; CPU, minutes."""
    c = tiny_sd()
    c.exp_name = "srrl_tiny_xl"
    c.family = "sdxl"
    c.pretrained.model = "builtin:tiny-sdxl"  # built on first use into ~/.cache/srrl (or $SRRL_CACHE)
    c.curriculum.total_stages = 5
    return c


def sd35() -> ml_collections.ConfigDict:
    """SD3.5 Medium (rectified flow, MMDiT) at 512 px with Flow-GRPO's sampling settings: 10 steps of the SDE at
    noise level 0.7 (``sample.eta``), CFG 4.5, LoRA rank 32 on the joint-attention projections."""
    c = base()
    c.exp_name = "srrl_sd35"
    c.family = "sd3"
    c.pretrained.model = "stabilityai/stable-diffusion-3.5-medium"
    c.mixed_precision = "bf16"
    c.sample.num_steps = 10
    c.sample.eta = 0.7  # the SDE's noise level a (docs/algorithm.md §3j)
    c.sample.guidance_scale = 4.5
    c.curriculum.split_right = 10
    c.lora_rank = 32
    c.lora_target_modules = SD3_LORA_TARGETS
    c.sample.max_micro_batch = 16
    c.train.gradient_checkpointing = True
    return c


def tiny_sd3() -> ml_collections.ConfigDict:
    """The embedded SD3 default: a tiny random SD3 pipeline (no T5) built offline and cached; CPU, minutes."""
    c = tiny_sd()
    c.exp_name = "srrl_tiny_sd3"
    c.family = "sd3"
    c.pretrained.model = "builtin:tiny-sd3"  # built on first use into ~/.cache/srrl (or $SRRL_CACHE)
    c.pretrained.text_encoder_3 = False
    c.pretrained.max_sequence_length = 16
    c.sample.eta = 0.7
    c.lora_target_modules = SD3_LORA_TARGETS
    c.curriculum.total_stages = 5
    c.eval.every = 5
    return c


def flux() -> ml_collections.ConfigDict:
    """FLUX.1-dev (rectified flow, guidance-distilled) at 512 px: FluxPipeline's guidance 3.5 as the transformer's
    guidance input (one pass), 512 T5 tokens, and the ``sd35`` preset's training settings (10 SDE steps at noise
    level 0.7, LoRA rank 32 on the attention projections)."""
    c = sd35()
    c.exp_name = "srrl_flux"
    c.family = "flux"
    c.pretrained.model = "black-forest-labs/FLUX.1-dev"
    c.pretrained.max_sequence_length = 512
    c.sample.guidance_scale = 3.5  # FluxPipeline's guidance_scale: the distilled guidance input, not CFG
    c.reflect.forward_guidance_scale = 3.5  # reflection's scales are guidance inputs here too: the distilled range
    c.reflect.inverse_guidance_scale = 1.0  # the weakest guidance the distilled model knows (SD's 0.1 is CFG)
    c.lora_target_modules = FLUX_LORA_TARGETS
    c.sample.max_micro_batch = 8
    return c


def flux_schnell() -> ml_collections.ConfigDict:
    """FLUX.1-schnell (timestep-distilled, no guidance input): 4 SDE steps, no CFG (guidance scale 1), 256 tokens."""
    c = flux()
    c.exp_name = "srrl_flux_schnell"
    c.pretrained.model = "black-forest-labs/FLUX.1-schnell"
    c.pretrained.max_sequence_length = 256
    c.sample.num_steps = 4
    c.curriculum.split_right = 4
    c.sample.guidance_scale = 1.0
    c.reflect.forward_guidance_scale = 1.0
    c.reflect.inverse_guidance_scale = 1.0
    return c


def tiny_flux() -> ml_collections.ConfigDict:
    """The embedded FLUX default: a tiny random FLUX.1-dev-shaped pipeline built offline and cached; CPU, minutes."""
    c = tiny_sd3()
    c.exp_name = "srrl_tiny_flux"
    c.family = "flux"
    c.pretrained.model = "builtin:tiny-flux"  # built on first use into ~/.cache/srrl (or $SRRL_CACHE)
    c.sample.guidance_scale = 3.5
    c.lora_target_modules = FLUX_LORA_TARGETS
    return c


def get_config(preset: str = "sd14") -> ml_collections.ConfigDict:
    """The config of ``preset`` (one of :data:`PRESETS`)."""
    builders = {"sd14": base, "tiny": tiny, "testbed": testbed, "tiny_sd": tiny_sd, "bench": bench, "sdxl": sdxl,
                "tiny_xl": tiny_xl, "sd35": sd35, "tiny_sd3": tiny_sd3, "flux": flux, "flux_schnell": flux_schnell,
                "tiny_flux": tiny_flux}
    if preset not in builders:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return builders[preset]()
