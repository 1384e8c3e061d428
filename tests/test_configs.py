"""Experiment configs: every file loads, variants parse, and the paper configs give the paper's sizes."""

import pytest

from experiments.configs import base, gemma_2b, pythia_1b, smollm2, tiny_cpu, tinyllama_1_1b
from rrt_jax import presets
from rrt_jax.model import count_params
from rrt_jax.train.setup import recursion_config


@pytest.mark.parametrize('module,variant,non_embedding_b', [
    (gemma_2b, 'b2_r0_stepwise', 0.99), (gemma_2b, 'b2_r512_average', 1.60), (gemma_2b, 'b3_r64_average', 0.74),
    (tinyllama_1_1b, 'b2_r256_average', 0.68), (pythia_1b, 'b2_r128_average', 0.48)])
def test_paper_configs_have_the_paper_sizes(module, variant, non_embedding_b):
  c = module.get_config(variant)
  count = count_params(presets.get(c.model.preset), recursion_config(c))
  assert abs(count.non_embedding / 1e9 - non_embedding_b) <= 0.0101
  assert c.model.source == 'hf' and c.model.dtype == 'bfloat16'


def test_every_config_loads():
  for module in (tiny_cpu, smollm2, gemma_2b, tinyllama_1_1b, pythia_1b):
    c = module.get_config()
    rec = recursion_config(c)
    assert rec.loops >= 1


def test_variant_tokens():
  c = base.apply_variant(base.base_config(), 'b2_r0_ends_zero')
  assert (c.recursion.loops, c.recursion.lora_rank, c.recursion.init, c.recursion.lora_init) == (
      2, None, 'stepwise_ends', 'zero')
  assert recursion_config(c).lora_rank is None
  with pytest.raises(ValueError, match='Unknown variant token'):
    base.apply_variant(base.base_config(), 'b2_rank64')
