"""The train step with frozen shared weights: only the trainable collections are differentiated, updated and have
optimizer moments; the result is the same as masking the full gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rrt_jax import presets
from rrt_jax.config import RecursionConfig
from rrt_jax.model import Decoder, init_variables
from rrt_jax.train.optimizer import learning_rate_schedule, make_optimizer, trainable_collections
from rrt_jax.train.step import LossConfig, init_state, make_train_step

CFG = presets.TINY_LLAMA
REC = RecursionConfig(loops=2, lora_rank=4, lora_init='zero')
LOSS = LossConfig(kd_weight=1.0, early_exit='aggressive')


def _batch(seed: int = 0, batch: int = 4, seq: int = 16) -> dict:
  tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, seq + 1)).astype(np.int32)
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
          'positions': jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1)),
          'segment_ids': jnp.ones((batch, seq), jnp.int32), 'loss_mask': jnp.ones((batch, seq), jnp.float32)}


def _recording(tx: optax.GradientTransformation, seen: list) -> optax.GradientTransformation:
  """tx that records the collections it is given (at trace time)."""
  def init(params):
    seen.append(('init', sorted(params)))
    return tx.init(params)

  def update(updates, state, params=None):
    seen.append(('update', sorted(updates)))
    return tx.update(updates, state, params)

  return optax.GradientTransformation(init, update)


def _run(trainable, tx, steps: int = 3, grad_accum: int = 1):
  variables = init_variables(CFG, REC, jax.random.key(0))
  teacher = init_variables(CFG, RecursionConfig(), jax.random.key(1))
  state = init_state(variables, tx, trainable)
  step = jax.jit(make_train_step(Decoder(CFG, REC), Decoder(CFG), tx, LOSS, grad_accum, trainable))
  losses = []
  for i in range(steps):
    state, metrics = step(state, teacher, _batch(i))
    losses.append(float(metrics['loss']))
  return variables, state, losses


@pytest.mark.parametrize('grad_accum', [1, 2])
def test_frozen_shared_weights_differentiate_and_update_only_lora(grad_accum):
  seen = []
  tx = make_optimizer(learning_rate_schedule(1e-2, 10, 0, 'constant'), freeze_shared=True)
  trainable = trainable_collections(True)
  initial, state, _ = _run(trainable, _recording(tx, seen), grad_accum=grad_accum)
  assert seen and all(collections == ['lora'] for _, collections in seen), seen  # No 'params' gradient.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.variables['params']),
               jax.device_get(initial['params']))
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.variables['lora'], initial['lora'])
  assert min(jax.tree.leaves(changed)) > 0, changed  # Every LoRA leaf trains (A gets gradients after B moves).
  # Adam's two moments of the LoRA collection and nothing params-shaped.
  lora_size = sum(x.size for x in jax.tree.leaves(initial['lora']))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * lora_size, (moments, lora_size)


def test_differentiating_only_lora_matches_masking_the_full_gradient():
  tx = make_optimizer(learning_rate_schedule(1e-2, 10, 0, 'constant'), freeze_shared=True)
  _, partitioned, losses = _run(trainable_collections(True), tx)
  _, masked, masked_losses = _run(None, tx)
  np.testing.assert_allclose(losses, masked_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), partitioned.variables,
               masked.variables)


def test_trainable_collections_missing_from_the_variables_are_an_error():
  tx = make_optimizer(learning_rate_schedule(1e-2, 10, 0, 'constant'), freeze_shared=True)
  vanilla = init_variables(CFG, RecursionConfig(), jax.random.key(0))
  with pytest.raises(ValueError, match='lora_rank'):
    init_state(vanilla, tx, trainable_collections(True))


def test_uptrain_on_batches_lowers_the_loss_and_leaves_the_input_untouched():
  """The studies' in-memory KD run: the loss falls on repeated batches, and the given variables (shared with the
  teacher after conversion) are copied, not donated."""
  from rrt_jax.convert import to_recursive
  from rrt_jax.train.loop import uptrain_on_batches
  cfg = presets.TINY_LLAMA
  teacher_vars = init_variables(cfg, RecursionConfig(), jax.random.key(0))
  rec = RecursionConfig(loops=2, init='average', lora_rank=4)
  student_vars = to_recursive(teacher_vars, cfg, rec)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           'segment_ids': np.ones((2, 16), np.int32), 'loss_mask': np.ones((2, 16), np.float32)}
  before = jax.tree.map(np.asarray, student_vars)
  _, losses = uptrain_on_batches(Decoder(cfg, rec), student_vars, Decoder(cfg), teacher_vars, [batch] * 6, lr=1e-2)
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(student_vars), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  # exit_alpha weighs loop 1's loss: the first step's loss is CE + KD at the last exit plus alpha x loop 1's.
  first = {alpha: uptrain_on_batches(Decoder(cfg, rec), student_vars, Decoder(cfg), teacher_vars, [batch], lr=1e-2,
                                     exit_alpha=alpha)[1][0] for alpha in (0.0, 0.1, 1.0)}
  assert first[1.0] > first[0.1] > first[0.0]
  np.testing.assert_allclose(first[1.0] - first[0.0], 10 * (first[0.1] - first[0.0]), rtol=1e-4)
