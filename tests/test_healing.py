"""Layer-wise healing: lowers the held-out reconstruction error, never touches the frozen shared weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.model.layerwise import apply_layer, depth_variables
from rrt_jax.pretrained.hf import load_hf
from rrt_jax.train.healing import HealingConfig, heal

SEQ = 16


def _batches(vocab: int, n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{'inputs': rng.integers(0, vocab, (2, SEQ)).astype(np.int32),
           'positions': np.tile(np.arange(SEQ, dtype=np.int32), (2, 1)),
           'segment_ids': np.ones((2, SEQ), np.int32)} for _ in range(n)]


@pytest.fixture(scope='module')
def original(tiny_hf):
  return load_hf(tiny_hf['llama'][0])


@pytest.mark.parametrize('rec', [RecursionConfig(loops=2, init='average', lora_rank=2),
                                 RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, init='average',
                                                 lora_rank=2)], ids=['cycle', 'middle_cycle'])
def test_healing_lowers_heldout_error_and_keeps_shared_weights(original, rec):
  cfg, vanilla = original
  relaxed = to_recursive(vanilla, cfg, rec)
  batches = _batches(cfg.vocab_size, 9)
  healed, report = heal(vanilla, cfg, rec, relaxed, batches, HealingConfig(steps_per_layer=30, lr=3e-3),
                        progress=False)
  looped = [d for d in range(cfg.num_layers) if not rec.is_unique_depth(d, cfg.num_layers)]
  assert len(report.before) == len(looped)
  assert all(a <= b for a, b in zip(report.after, report.before, strict=True))
  assert np.mean(report.after) < 0.95 * np.mean(report.before)
  for x, y in zip(jax.tree.leaves(relaxed['params']), jax.tree.leaves(healed['params']), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # Frozen: bit-identical.
  changed = [not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(relaxed['lora']), jax.tree.leaves(healed['lora']), strict=True)]
  assert any(changed)
  # Independently, at the first looped depth (whose input is the original model's there: the unique layers before
  # it are the original ones): the healed layer is closer to the original layer on the held-out batch.
  held, first = batches[-1], looped[0]
  h = Decoder(cfg).apply(vanilla, jnp.asarray(held['inputs']), method=Decoder.embed)
  for depth in range(first):
    h = apply_layer(cfg, RecursionConfig(), depth_variables(vanilla, cfg, RecursionConfig(), depth), h,
                    held['positions'])[0]
  run = lambda c, r, v: apply_layer(c, r, depth_variables(v, c, r, first), h, held['positions'])[0]  # noqa: E731
  target = run(cfg, RecursionConfig(), vanilla)
  err = lambda v: float(jnp.linalg.norm(run(cfg, rec, v) - target))  # noqa: E731
  assert err(healed) < err(relaxed)
  np.testing.assert_allclose(err(healed) / float(jnp.linalg.norm(target - h)), report.after[0], rtol=1e-3)


def test_healing_needs_a_relaxed_model_and_enough_batches(original):
  cfg, vanilla = original
  rec = RecursionConfig(loops=2)
  with pytest.raises(ValueError, match='lora_rank'):
    heal(vanilla, cfg, rec, to_recursive(vanilla, cfg, rec), _batches(cfg.vocab_size, 3))
  relaxed_rec = rec.replace(lora_rank=2)
  with pytest.raises(ValueError, match='heldout_batches'):
    heal(vanilla, cfg, relaxed_rec, to_recursive(vanilla, cfg, relaxed_rec), _batches(cfg.vocab_size, 1))


def test_the_training_recipe_calibrates_and_heals(original):
  """train.setup.convert_student: whitened-SVD sequential conversion + healing from a text source, and the plain
  conversion when resuming (recipe=False)."""
  from experiments.configs import smollm2
  from rrt_jax.convert.calibration import CalibrationConfig, calibration_batches, convert
  from rrt_jax.model import check_variables
  from rrt_jax.train.setup import convert_student, recursion_config

  class Chars:  # Ids 2..97 (bytes 'a'..), 1 = EOS: fits the tiny model's vocabulary.
    eos_id = 1

    def encode(self, text):
      return type('E', (), {'ids': [2 + (ord(ch) - 97) % 90 for ch in text]})()

  rng = np.random.default_rng(0)
  source = [{'text': ''.join(chr(97 + int(x)) for x in rng.integers(0, 26, 60))} for _ in range(80)]
  cfg, vanilla = original
  c = smollm2.get_config('b2_r2_average')
  c.calibration.tokens, c.calibration.seq_len, c.calibration.batch_size = 256, 32, 2
  c.healing.steps_per_layer, c.healing.tokens = 3, 192
  rec = recursion_config(c)
  student = convert_student(c, cfg, rec, vanilla, source, Chars(), workdir='unused', recipe=True)
  check_variables(student, cfg, rec)
  calibration = CalibrationConfig(**c.calibration)
  unhealed = convert(vanilla, cfg, rec, calibration_batches(source, Chars(), calibration, cfg.max_seq_len),
                     calibration, progress=False)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(student['lora']),
                                                        jax.tree.leaves(unhealed['lora']), strict=True))
  assert diff > 0, 'healing must change the calibrated LoRA'
  plain = convert_student(c, cfg, rec, vanilla, source, Chars(), workdir='unused', recipe=False)
  expected = to_recursive(vanilla, cfg, rec.replace(lora_init='svd'))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
