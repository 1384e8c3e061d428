"""Invariant 8 (core part): bad input gets a clear error that names the fix."""

import jax
import pytest

from rrt_jax import Decoder, ModelConfig, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.model import check_variables, init_variables


def test_loops_must_divide_layers():
  with pytest.raises(ValueError, match=r'loops=4 does not divide num_layers=6; choose loops from \[1, 2, 3, 6\]'):
    RecursionConfig(loops=4).shared_layers(6)
  with pytest.raises(ValueError, match='does not divide'):
    init_variables(presets.TINY_LLAMA, RecursionConfig(loops=4), jax.random.key(0))


@pytest.mark.parametrize('rank', [0, -8])
def test_rank_must_be_positive(rank):
  with pytest.raises(ValueError, match='lora_rank must be a positive integer.*lora_rank=None'):
    RecursionConfig(loops=2, lora_rank=rank)


def test_unknown_names_list_the_choices():
  with pytest.raises(ValueError, match="Unknown init method 'avg'.*'average'"):
    RecursionConfig(init='avg')
  with pytest.raises(ValueError, match="Unknown looping 'cyclic'.*'cycle', 'sequence'"):
    RecursionConfig(looping='cyclic')
  with pytest.raises(ValueError, match='Unknown LoRA targets'):
    RecursionConfig(lora_rank=4, lora_targets=('qkv',))
  with pytest.raises(ValueError, match='Unknown family'):
    ModelConfig(family='gpt2', vocab_size=8, num_layers=2, d_model=8, num_heads=2, num_kv_heads=2,
                head_dim=4, mlp_dim=8)
  with pytest.raises(ValueError, match='Unknown preset'):
    presets.get('gemma_7b')


def test_variables_of_another_config_are_rejected():
  cfg = presets.TINY_LLAMA
  variables = init_variables(cfg, RecursionConfig(), jax.random.key(0))
  check_variables(variables, cfg, RecursionConfig())  # Matching: no error.
  rec = RecursionConfig(loops=2, lora_rank=4)
  with pytest.raises(ValueError, match=r'has shape \(6, .*expected \(3, .*and \d+ more'):
    check_variables(variables, cfg, rec)
  with pytest.raises(ValueError, match='has 6 layers, expected 12'):
    to_recursive(variables, cfg.replace(num_layers=12), RecursionConfig(loops=2))


def test_decoding_with_a_cache_needs_positions():
  cfg = presets.TINY_LLAMA
  variables = init_variables(cfg, RecursionConfig(), jax.random.key(0))
  from rrt_jax.model import init_cache
  with pytest.raises(ValueError, match='needs positions'):
    Decoder(cfg).apply(variables, jax.numpy.zeros((1, 2), int), cache=init_cache(cfg, RecursionConfig(), 1, 4))
