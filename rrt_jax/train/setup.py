"""What a training run builds from its ConfigDict before the first step: processes, model, variables, optimizer,
losses and data.

Config sections unpack into their dataclasses (RecursionConfig(**c.recursion), LossConfig(**c.loss)): a section's
keys are the dataclass's fields, and a field that lives in another section is passed explicitly.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np
import optax

from rrt_jax import presets
from rrt_jax.config import LoraInit, ModelConfig, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.model import init_variables
from rrt_jax.sharding import variable_shardings
from rrt_jax.train.optimizer import learning_rate_schedule, make_optimizer, trainable_collections
from rrt_jax.train.step import LossConfig
from rrt_jax.utils.uri import is_uri

log = logging.getLogger(__name__)


def init_distributed(c: ml_collections.ConfigDict) -> None:
  """jax.distributed for multi-process runs: distributed.coordinator 'host:port' with num_processes and
  process_id, or 'auto' for jax's own cluster detection (Cloud TPU pods, SLURM, ...); empty = one process."""
  d = c.distributed
  if not d.coordinator:
    return
  if os.environ.get('JAX_PLATFORMS') == 'cpu':  # (Asking jax for its backend here would initialise it.)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Cross-process CPU collectives.
  if d.coordinator == 'auto':
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                               process_id=d.process_id)


def recursion_config(c: ml_collections.ConfigDict) -> RecursionConfig:
  return RecursionConfig(**c.recursion, seed=c.train.seed)  # The run's seed also draws Random init and LoRA A.


def loss_config(c: ml_collections.ConfigDict) -> LossConfig:
  return LossConfig(**c.loss)


def optimizer(c: ml_collections.ConfigDict) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """(learning-rate schedule, AdamW) from c.train."""
  t = c.train
  schedule = learning_rate_schedule(t.lr, t.steps, t.warmup_steps, t.decay, t.end_lr_ratio)
  return schedule, make_optimizer(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, clip_norm=t.clip_norm,
                                  freeze_shared=t.freeze_shared)


def trainable(c: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The collections that get gradients (train.step's `trainable`): LoRA alone with train.freeze_shared."""
  return trainable_collections(c.train.freeze_shared)


def load_original(c: ml_collections.ConfigDict, vocab_size: int) -> tuple[ModelConfig, dict | None]:
  """The original (teacher) model: the packaged SmolLM2, an HF checkpoint, or a random preset (variables
  None: random models are initialised directly into their shardings by `initial_variables`)."""
  m = c.model
  if m.source == 'smollm2':
    from rrt_jax.pretrained.gguf import load_gguf
    cfg, variables = load_gguf()
  elif m.source == 'hf':
    if not m.path:
      raise ValueError('model.source=hf needs --config.model.path=/path/to/hf_checkpoint_dir.')
    from rrt_jax.pretrained.hf import load_hf
    cfg, variables = load_hf(m.path)
  elif m.source == 'random':
    cfg, variables = presets.get(m.preset).replace(vocab_size=vocab_size), None
  else:
    raise ValueError(f'Unknown model.source {m.source!r}: choose smollm2, hf or random.')
  return cfg.replace(dtype=m.dtype, remat=m.remat, attention=m.attention), variables


def convert_student(c: ml_collections.ConfigDict, cfg: ModelConfig, rec: RecursionConfig, vanilla: dict, source,
                    tokenizer, workdir: str, recipe: bool = True) -> dict:
  """The conversion recipe on the host: vanilla -> recursive/relaxed (whitened SVD LoRA calibrated on
  c.calibration.tokens of the training source, sequentially if c.calibration.sequential), then layer-wise
  healing for c.healing.steps_per_layer steps per depth position. recipe=False: the plain weight-space
  conversion (a template for a run that resumes from a checkpoint)."""
  from rrt_jax.convert.calibration import CalibrationConfig, calibration_batches, convert
  from rrt_jax.train.healing import HealingConfig, heal
  if not recipe:
    return to_recursive(vanilla, cfg, rec.replace(lora_init='svd') if rec.has_lora else rec)
  calibration = CalibrationConfig(**c.calibration)
  needs_data = rec.has_lora and rec.lora_init == LoraInit.WHITENED_SVD
  batches = calibration_batches(source, tokenizer, calibration, cfg.max_seq_len) if needs_data else None
  cache = None if is_uri(workdir) else os.path.join(os.fspath(workdir), 'calibration')  # Local files only.
  student = convert(vanilla, cfg, rec, batches, calibration, cache_dir=cache, progress=jax.process_index() == 0)
  healing = HealingConfig(**c.healing)
  if healing.steps_per_layer and rec.has_lora:
    # Every process heals on the same text, so all of them end with the same variables.
    heal_batches = calibration_batches(source, tokenizer, CalibrationConfig(
        tokens=healing.tokens, seq_len=calibration.seq_len, batch_size=calibration.batch_size), cfg.max_seq_len,
        seed=calibration_seed(c) + 1, replicated=True)
    student, report = heal(vanilla, cfg, rec, student, heal_batches, healing, progress=jax.process_index() == 0)
    log.info('healing: held-out relative layer error %.4f -> %.4f (mean over depth positions)',
             float(np.mean(report.before)), float(np.mean(report.after)))
  return student


def calibration_seed(c: ml_collections.ConfigDict) -> int:
  return 1234 + c.data.seed


def initial_variables(c: ml_collections.ConfigDict, cfg: ModelConfig, rec: RecursionConfig, vanilla: dict | None,
                      mesh: jax.sharding.Mesh, use_teacher: bool,
                      student: dict | None = None) -> tuple[dict, dict | None]:
  """(student, teacher) variables placed with their shardings. Pretrained weights are converted on the host
  (`student`, see convert_student; plain conversion when None) and each leaf is placed sharded; random weights
  are created sharded (no full copy on one device)."""
  student_shardings = variable_shardings(cfg, rec, mesh)
  teacher_shardings = variable_shardings(cfg, RecursionConfig(), mesh)
  if vanilla is None:
    key = jax.random.key(c.train.seed)
    student = init_variables(cfg, rec, key, student_shardings)
    if not use_teacher:  # (A random teacher is its own draw: the student does not depend on it.)
      return student, None
    teacher = init_variables(cfg, RecursionConfig(), jax.random.fold_in(key, 1), teacher_shardings)
  else:
    student = jax.device_put(to_recursive(vanilla, cfg, rec) if student is None else student, student_shardings)
    teacher = jax.device_put(vanilla, teacher_shardings)
  return student, teacher if use_teacher else None


def data_iterators(c: ml_collections.ConfigDict, source, tokenizer, max_seq_len: int,
                   vocab_size: int | None = None) -> list:
  """This process's iterators: data.shards virtual shards (None = one per process) split over the processes, so
  the global batch is the same whatever the number of hosts (rows of shard i are rows i*b .. (i+1)*b - 1)."""
  from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
  shards = jax.process_count() if c.data.shards is None else c.data.shards
  if shards < 1 or shards % jax.process_count():
    raise ValueError(f'data.shards={shards} must be a positive multiple of the {jax.process_count()} processes.')
  if c.data.global_batch % shards:
    raise ValueError(f'data.global_batch={c.data.global_batch} must divide over data.shards={shards}.')
  if c.data.global_batch % c.train.grad_accum:
    raise ValueError(f'data.global_batch={c.data.global_batch} must be a multiple of train.grad_accum.')
  per_process = shards // jax.process_count()
  config = PipelineConfig(c.data.seq_len, c.data.global_batch // shards, seed=c.data.seed,
                          worker_count=c.data.worker_count)
  first = jax.process_index() * per_process
  # vocab_size: every id is checked on the host against the model's vocabulary (a clear error, not NaN logits).
  return [iter(lm_dataset(source, tokenizer, config, max_seq_len=max_seq_len, shard_index=i, shard_count=shards,
                          vocab_size=vocab_size))
          for i in range(first, first + per_process)]
