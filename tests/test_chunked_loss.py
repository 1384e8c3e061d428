"""The chunked loss (hidden states -> logits a chunk of tokens at a time) is the full uptraining loss: same value,
metrics and gradients, the same train step; and its compiled program really holds less than the whole logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rrt_jax import presets
from rrt_jax.config import RecursionConfig
from rrt_jax.model import Decoder, variable_shapes
from rrt_jax.train.losses import chunked_uptraining_loss, uptraining_loss
from rrt_jax.train.step import LossConfig, init_state, make_train_step

CFG = presets.TINY_LLAMA
REC = RecursionConfig(loops=3, lora_rank=4)  # 3 exits: the last_loop target has intermediate loops to distil.
SEQ = 20  # Not a multiple of most chunk sizes below: the last chunk is padded.


def _random(shapes, seed: int) -> dict:
  """Random variables of these shapes without compiling the model's init: norm scales near 1, the rest (LoRA
  included, so it changes the outputs and all its leaves get gradients) small noise."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    noise = rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(1 + 0.1 * noise if "['scale']" in name else noise if 'embedding' in name else 0.1 * noise)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _variables(cfg=CFG, rec=REC) -> tuple[dict, dict]:
  """(student variables, vanilla teacher variables)."""
  return _random(variable_shapes(cfg, rec), 0), _random(variable_shapes(cfg, RecursionConfig()), 1)


def _batch(seed: int = 0, batch: int = 2, seq: int = SEQ, vocab: int = CFG.vocab_size) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  mask = (rng.random((batch, seq)) > 0.3).astype(np.float32)
  mask[0, -5:] = 0  # Unscored tail (and tokens inside the padded last chunk's real part).
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
          'positions': jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1)),
          'segment_ids': jnp.ones((batch, seq), jnp.int32), 'loss_mask': jnp.asarray(mask)}


@functools.cache
def _hidden_and_heads():
  """Random exit hidden states [E, B, S, D] and teacher hidden states [B, S, D], the two heads' variables (final
  norm, LM head) and a batch: the loss sees the model only through these."""
  rng = np.random.default_rng(5)
  b = _batch()
  hidden = jnp.asarray(rng.normal(size=(REC.loops, *b['inputs'].shape, CFG.d_model)), jnp.float32)
  teacher_hidden = jnp.asarray(rng.normal(size=(*b['inputs'].shape, CFG.d_model)), jnp.float32)
  head = lambda v: {'params': {k: v['params'][k] for k in ('final_norm', 'lm_head')}}  # noqa: E731
  student_vars, teacher_vars = _variables()
  return hidden, teacher_hidden, head(student_vars), head(teacher_vars), b


# (early_exit, kd_weight, kd_target, temperature, chunk_size): padded, dividing (5 | 20) and one-chunk (64 > S) sizes.
CASES = [('aggressive', 0.0, 'teacher', 1.0, 8), ('weighted', 0.0, 'teacher', 1.0, 5),
         ('aggressive', 0.5, 'teacher', 2.0, 8), ('weighted', 1.0, 'teacher', 1.0, 64),
         ('aggressive', 1.0, 'last_loop', 1.0, 5), ('weighted', 0.5, 'last_loop', 2.0, 8)]


@pytest.mark.parametrize('early_exit,kd_weight,kd_target,temperature,chunk_size', CASES)
def test_chunked_loss_matches_the_full_loss_and_its_gradients(early_exit, kd_weight, kd_target, temperature,
                                                              chunk_size):
  """Same loss, metrics and gradients w.r.t. the hidden states and the head's variables: by the chain rule, the
  same gradients of every variable below the head (the train-step test below checks them end to end)."""
  hidden, teacher_hidden, head_vars, teacher_head_vars, b = _hidden_and_heads()
  student, teacher = Decoder(CFG, REC), Decoder(CFG)
  teacher_head = lambda h: teacher.apply(teacher_head_vars, h, method=Decoder.logits)  # noqa: E731
  kw = dict(ce_weight=0.7, kd_weight=kd_weight, temperature=temperature, early_exit=early_exit, exit_alpha=0.3,
            kd_target=kd_target)

  def full(hidden, head_vars):
    logits = student.apply(head_vars, hidden, method=Decoder.logits)
    return uptraining_loss(logits, b['targets'], b['loss_mask'], teacher_head(teacher_hidden), **kw)

  def chunked(hidden, head_vars):
    return chunked_uptraining_loss(hidden, lambda h: student.apply(head_vars, h, method=Decoder.logits),
                                   b['targets'], b['loss_mask'], teacher_hidden, teacher_head,
                                   chunk_size=chunk_size, **kw)

  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)  # noqa: E731
  ((loss, metrics), grads), ((c_loss, c_metrics), c_grads) = jax.jit(
      lambda *a: (grad(full)(*a), grad(chunked)(*a)))(hidden, head_vars)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  assert sorted(c_metrics) == sorted(metrics) == sorted(['ce_per_loop', 'exit_weights'] +
                                                        ['kd_per_loop'] * bool(kd_weight))
  for k in metrics:
    np.testing.assert_allclose(c_metrics[k], metrics[k], rtol=1e-5, err_msg=k)
  assert metrics['ce_per_loop'].shape == (REC.loops,)
  jax.tree.map(lambda c, f: np.testing.assert_allclose(c, f, rtol=1e-5, atol=1e-6), c_grads, grads)
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
  # Unscored tokens get no gradient (nor, with padding, do their neighbours in the padded last chunk leak any).
  np.testing.assert_array_equal(c_grads[0][:, 0, -5:], 0.0)


def test_chunked_loss_arguments_are_checked():
  h = jnp.zeros((2, 1, 4, 8))
  head = lambda x: x  # noqa: E731
  with pytest.raises(ValueError, match='chunk_size=0'):
    chunked_uptraining_loss(h, head, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)), None, None, chunk_size=0)
  with pytest.raises(ValueError, match='teacher'):
    chunked_uptraining_loss(h, head, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)), None, None, chunk_size=2,
                            kd_weight=1.0)
  with pytest.raises(ValueError, match='loss.chunk_size'):
    LossConfig(chunk_size=-1)


def test_train_step_with_chunks_gives_the_same_update():
  student_vars, teacher_vars = _variables()
  tx = optax.sgd(0.1)  # Linear in the gradient: Adam's first step is sign(g), which would amplify rounding at g ~ 0.
  results = []
  for chunk_size in (0, 8):
    loss_cfg = LossConfig(kd_weight=1.0, early_exit='aggressive', kd_target='last_loop', chunk_size=chunk_size)
    step = jax.jit(make_train_step(Decoder(CFG, REC), Decoder(CFG), tx, loss_cfg))
    results.append(step(init_state(student_vars, tx), teacher_vars, _batch(3)))
  (full, full_metrics), (chunked, chunked_metrics) = results
  assert sorted(full_metrics) == sorted(chunked_metrics)
  for k in full_metrics:
    np.testing.assert_allclose(chunked_metrics[k], full_metrics[k], rtol=1e-5, err_msg=k)
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), full.variables, student_vars)
  assert min(jax.tree.leaves(changed)) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunked.variables,
               full.variables)


def test_chunked_loss_compiles_to_less_memory_than_the_full_logits():
  """Loss + gradient, vocab-heavy (V = 128 D): the full loss holds several [E, B, S, V] fp32 logits (~50 MB each),
  the chunked one a few chunks' worth. Without the remat the scan keeps residuals of every chunk's logits for the
  backward pass, and without chunking there is nothing saved: either way the temp memory exceeds one whole logits."""
  cfg = CFG.replace(vocab_size=8192)
  student, teacher = Decoder(cfg, REC), Decoder(cfg)
  head_vars = {'params': {k: v for k, v in variable_shapes(cfg, REC)['params'].items()
                          if k in ('final_norm', 'lm_head')}}
  e, batch, seq, d = REC.loops, 2, 256, cfg.d_model
  hidden = jax.ShapeDtypeStruct((e, batch, seq, d), jnp.float32)
  teacher_hidden = jax.ShapeDtypeStruct((batch, seq, d), jnp.float32)
  targets = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, seq), jnp.float32)
  kw = dict(kd_weight=1.0, early_exit='aggressive', kd_target='last_loop')

  def full(hidden, head_vars, teacher_hidden, targets, mask):
    logits = student.apply(head_vars, hidden, method=Decoder.logits)
    return uptraining_loss(logits, targets, mask, teacher.apply(head_vars, teacher_hidden, method=Decoder.logits),
                           **kw)[0]

  def chunked(hidden, head_vars, teacher_hidden, targets, mask):
    head = lambda h: student.apply(head_vars, h, method=Decoder.logits)  # noqa: E731
    teacher_head = lambda h: teacher.apply(head_vars, h, method=Decoder.logits)  # noqa: E731
    return chunked_uptraining_loss(hidden, head, targets, mask, teacher_hidden, teacher_head, chunk_size=32, **kw)[0]

  temp = {}
  for name, f in (('full', full), ('chunked', chunked)):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(hidden, head_vars, teacher_hidden, targets,
                                                                   mask).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = e * batch * seq * cfg.vocab_size * 4
  assert temp['full'] > logits_bytes, temp  # The full loss really holds the logits: the comparison means something.
  assert temp['chunked'] < 0.6 * temp['full'], temp
  # Less than one whole [E, B, S, V] logits (on CPU: ~39 MB vs 50 MB; without the remat ~167 MB, full ~420 MB).
  assert temp['chunked'] < logits_bytes, temp
