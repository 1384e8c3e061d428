"""Defaults shared by every experiment config. Each config file's get_config(variant) starts from these."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  """Sections unpack into their dataclasses (RecursionConfig(**c.recursion), LossConfig(**c.loss), ...), so their
  keys are those dataclasses' fields; a None-able field is a typed placeholder (flags can set a value, not None)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.source = 'smollm2'  # 'smollm2' (packaged GGUF) | 'hf' (model.path) | 'random' (model.preset)
  c.model.path = ''
  c.model.preset = 'smollm2_135m'
  c.model.dtype = 'float32'  # Compute dtype: 'bfloat16' on accelerators.
  c.model.remat = 'none'  # none | full | dots | dots_no_batch (rrt_jax.config.RematPolicy)
  # auto (cuDNN on GPUs in bf16, the Pallas splash kernel on TPUs, einsum on CPUs) | einsum | xla | cudnn | splash:
  # training/scoring attention without a cache; decoding always uses the einsum (rrt_jax/model/attention.py).
  c.model.attention = 'auto'

  c.recursion = ml_collections.ConfigDict()
  c.recursion.loops = 3
  c.recursion.looping = 'cycle'  # cycle | sequence | middle_cycle (with unique_layers > 0)
  c.recursion.unique_layers = 0  # middle_cycle: first and last layers that keep their own weights.
  c.recursion.init = 'average'
  c.recursion.norm_init = 'auto'
  c.recursion.lora_rank = ml_collections.FieldReference(64, field_type=int)  # None (variant r0): no LoRA.
  c.recursion.lora_alpha = placeholder(float)  # None: alpha equal to the rank (scale 1).
  c.recursion.lora_targets = 'q,k,v,o,gate,up,down'
  c.recursion.lora_init = 'svd'
  c.recursion.relax_vectors = True

  # The conversion recipe (train/setup.py convert_student): calibration for whitened-SVD LoRA
  # (CalibrationConfig), then layer-wise healing (HealingConfig; steps_per_layer 0 = off).
  c.calibration = ml_collections.ConfigDict()
  c.calibration.tokens = 32_768
  c.calibration.seq_len = 512
  c.calibration.batch_size = 4
  c.calibration.ridge = 1e-3
  c.calibration.diagonal = False  # True for models whose MLP width makes full Gram matrices too big (Gemma-2B).
  c.calibration.sequential = True

  c.healing = ml_collections.ConfigDict()
  c.healing.steps_per_layer = 0
  c.healing.lr = 1e-3
  c.healing.heldout_batches = 1
  c.healing.dtype = 'float32'
  c.healing.tokens = 16_384

  c.data = ml_collections.ConfigDict()
  # '' = the packaged corpora (split data.split); your own: tfds:<name>[:<split>] | jsonl:<path or glob> |
  # arrayrecord:<glob> (raw UTF-8 records) | arrayrecord+json:<glob>, each @<weight>, comma-separated to mix
  # (rrt_jax/data/sources.py). data.text_field names the text in JSON records and TFDS features.
  c.data.source = ''
  c.data.text_field = 'text'
  c.data.split = 'train'
  # auto (the model's own: SmolLM2's, or model.path's tokenizer.json for hf; random models must name one) |
  # smollm2 | bytes (tiny from-scratch models) | hf:<dir with tokenizer.json> (rrt_jax.pretrained.tokenizer).
  c.data.tokenizer = 'auto'
  c.data.seq_len = 256
  c.data.global_batch = 8
  c.data.worker_count = 0
  # Virtual data shards (None: one per process); a fixed number makes runs independent of the host count.
  c.data.shards = placeholder(int)
  c.data.seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.lr = 3e-4
  c.train.warmup_steps = 10
  c.train.decay = 'cosine'
  c.train.end_lr_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.clip_norm = 1.0
  c.train.grad_accum = 1
  c.train.freeze_shared = False
  c.train.seed = 0

  c.loss = ml_collections.ConfigDict()
  c.loss.ce_weight = 1.0
  c.loss.kd_weight = 1.0
  c.loss.temperature = 1.0
  c.loss.early_exit = 'aggressive'  # none | aggressive | weighted
  c.loss.exit_alpha = 0.1
  c.loss.kd_target = 'teacher'  # teacher | last_loop
  c.loss.chunk_size = 0  # > 0: the loss a chunk of tokens at a time, never the whole [E, B, S, V] logits.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn = 1  # Slices (multislice TPU): the batch is also split over them; data/fsdp/tensor are per slice.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log_every = 10
  # Held-out evaluation while training (steps; 0 = off): every eval_every steps and at the run's last step, the
  # loss (mean CE per token) and perplexity at every loop's exit on one fixed set of windows (built once with the
  # run's tokenizer; rrt_jax.eval.perplexity), logged as eval/loss/loop<i> and eval/ppl/loop<i>.
  c.eval_every = 0
  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'validation'  # A packaged corpus split: train | validation | austen | brown | wikipedia.
  c.eval.tokens = 4096  # Its first tokens, scored once each in windows of data.seq_len.
  # Windows per scoring call (it forms [loops, batch, seq_len, vocab] logits); 0 = the training micro-batch
  # (data.global_batch / train.grad_accum), split over the mesh's batch axes like a training batch.
  c.eval.batch = 0
  # A jax.profiler trace (TensorBoard's profile tab) of profile.steps steps from step profile.start_step (numbered
  # as in metrics.jsonl; -1 = off), written by process 0 into <workdir>/profile.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = -1
  c.profile.steps = 3
  # Weights & Biases: the rows of metrics.jsonl also logged to this project ('' = off; needs `pip install wandb`).
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ''
  c.wandb.entity = ''  # '' = your default entity.
  c.wandb.name = ''  # The run's display name; '' = W&B's.
  c.distributed = ml_collections.ConfigDict()
  # host:port (with num_processes and process_id); 'auto': jax.distributed.initialize() detects the cluster (Cloud
  # TPU pods, SLURM, ...); empty = single process.
  c.distributed.coordinator = ''
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Variant strings like 'b2_r128_average': bN = loops, rN = LoRA rank (r0 = none), and an init name."""
  for token in filter(None, (variant or '').split('_')):
    if token[0] == 'b' and token[1:].isdigit():
      c.recursion.loops = int(token[1:])
    elif token[0] == 'r' and token[1:].isdigit():
      c.recursion.lora_rank = int(token[1:]) or None
    elif token in ('stepwise', 'average', 'lower', 'upper', 'random', 'ends'):
      c.recursion.init = 'stepwise_ends' if token == 'ends' else token
    elif token in ('zero', 'svd', 'whitened'):
      c.recursion.lora_init = 'whitened_svd' if token == 'whitened' else token
    else:
      raise ValueError(f'Unknown variant token {token!r} in {variant!r}: use bN (loops), rN (rank), an init '
                       '(stepwise, ends, average, lower, upper, random) or a LoRA init (svd, whitened, zero).')
  return c


def paper_config(preset: str, variant: str) -> ml_collections.ConfigDict:
  """The paper's setting for one of its base models (an HF checkpoint given by --config.model.path)."""
  c = base_config()
  c.model.source = 'hf'
  c.model.preset = preset
  c.model.dtype = 'bfloat16'
  # Sized by the memory plan (BUILD_NOTES, `python -m experiments.plan`): fits a v5e-64 and a v4-32.
  c.model.remat = 'full'
  c.loss.chunk_size = 256  # The logits of 2048 tokens (vocab 32k-256k) would dwarf the activations.
  c.train.grad_accum = 4  # 64 sequences per micro-batch: 1 per chip on a v5e-64, 2 on a v4-32.
  c.data.seq_len = 2048
  c.data.global_batch = 256
  c.train.steps = 10_000
  c.train.lr = 1e-4
  c.train.warmup_steps = 200
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.checkpoint.every_steps = 500
  c.log_every = 20
  return apply_variant(c, variant)
