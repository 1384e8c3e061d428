"""Orbax checkpoints with the configs alongside: `model, variables = rrt_jax.load(path)`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rrt_jax
from rrt_jax import RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.model import init_variables


def test_save_and_load_a_relaxed_model(tmp_path):
  cfg = presets.TINY_PYTHIA
  vanilla = init_variables(cfg, RecursionConfig(), jax.random.key(0))
  rec = RecursionConfig(loops=3, looping='cycle', init='average', lora_rank=4, lora_alpha=8.0,
                        lora_targets=('q', 'v', 'down'))
  variables = to_recursive(vanilla, cfg, rec)
  rrt_jax.save(str(tmp_path / 'ckpt'), cfg, rec, variables)
  model, restored = rrt_jax.load(str(tmp_path / 'ckpt'))
  assert (model.cfg, model.rec) == (cfg, rec)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  tokens = jnp.arange(12)[None] % cfg.vocab_size
  np.testing.assert_array_equal(model.apply(restored, tokens)[0], model.apply(variables, tokens)[0])


def test_incomplete_checkpoint_is_reported(tmp_path):
  cfg = presets.TINY_LLAMA
  rec = RecursionConfig(loops=2)
  path = rrt_jax.save(str(tmp_path / 'ckpt'), cfg, rec, init_variables(cfg, rec, jax.random.key(0)))
  os.remove(os.path.join(path, 'model_config.json'))
  with pytest.raises(FileNotFoundError, match='not a complete rrt_jax checkpoint'):
    rrt_jax.load(path)


def test_checkpoint_of_another_shape_is_reported(tmp_path):
  cfg = presets.TINY_LLAMA
  rec = RecursionConfig(loops=2)
  path = rrt_jax.save(str(tmp_path / 'ckpt'), cfg, rec, init_variables(cfg, rec, jax.random.key(0)))
  config_path = os.path.join(path, 'model_config.json')
  with open(config_path) as f:
    data = json.load(f)
  data['recursion']['loops'] = 3  # Claims 2 shared layers; the saved block has 3.
  with open(config_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match='Could not restore|do not match'):
    rrt_jax.load(path)
