"""Uptraining losses: KD is zero for a perfect student, early-exit weights match their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax.train.losses import cross_entropy, exit_weights, forward_kl, uptraining_loss

RNG = np.random.default_rng(0)
LOGITS = jnp.asarray(RNG.normal(size=(3, 2, 5, 11)), jnp.float32)  # [E, B, S, V]
TARGETS = jnp.asarray(RNG.integers(0, 11, size=(2, 5)))
MASK = jnp.asarray((RNG.random((2, 5)) > 0.3).astype(np.float32))


def test_exit_weights():
  np.testing.assert_allclose(exit_weights(3, 'none'), [0, 0, 1])
  np.testing.assert_allclose(exit_weights(3, 'aggressive', 0.1), [0.1, 0.1, 1.0])
  np.testing.assert_allclose(exit_weights(4, 'weighted'), np.array([1, 2, 3, 4]) / 10)
  with pytest.raises(ValueError, match='Unknown early-exit scheme'):
    exit_weights(2, 'greedy')


def test_kd_is_zero_when_the_student_is_the_teacher():
  for t in (1.0, 2.0):
    kl = forward_kl(LOGITS[-1:], LOGITS[-1], temperature=t)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
  assert float(forward_kl(LOGITS[:1], LOGITS[-1]).mean()) > 0.01
  loss, metrics = uptraining_loss(LOGITS, TARGETS, MASK, LOGITS[-1], ce_weight=0.0, kd_weight=1.0)
  np.testing.assert_allclose(metrics['kd_per_loop'][-1], 0.0, atol=1e-6)


def test_kd_gives_no_gradient_to_the_teacher():
  grad = jax.grad(lambda t: forward_kl(LOGITS, t).sum())(LOGITS[-1])
  assert float(jnp.abs(grad).max()) == 0.0


def test_loss_is_the_weighted_sum_of_per_loop_terms():
  teacher = LOGITS[0] * 0.5
  loss, m = uptraining_loss(LOGITS, TARGETS, MASK, teacher, ce_weight=0.7, kd_weight=0.3, temperature=2.0,
                            early_exit='aggressive', exit_alpha=0.2)
  # Reference: masked mean CE per loop by hand.
  ce = [float(jnp.sum(cross_entropy(LOGITS[b:b + 1], TARGETS)[0] * MASK) / MASK.sum()) for b in range(3)]
  np.testing.assert_allclose(m['ce_per_loop'], ce, rtol=1e-5)
  expected = sum(w * (0.7 * c + 0.3 * k) for w, c, k in zip([0.2, 0.2, 1.0], ce, m['kd_per_loop'], strict=True))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_self_distillation_target_for_intermediate_loops():
  _, m = uptraining_loss(LOGITS, TARGETS, MASK, LOGITS[0], kd_weight=1.0, kd_target='last_loop')
  own = float(jnp.sum(forward_kl(LOGITS[:1], LOGITS[-1])[0] * MASK) / MASK.sum())
  np.testing.assert_allclose(m['kd_per_loop'][0], own, rtol=1e-5)
  np.testing.assert_allclose(m['kd_per_loop'][-1], float(jnp.sum(forward_kl(LOGITS[-1:], LOGITS[0])[0] * MASK)
                                                          / MASK.sum()), rtol=1e-5)
