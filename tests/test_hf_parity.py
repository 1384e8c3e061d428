"""Invariant 1: our vanilla model == HF transformers (PyTorch) logits, fp32, for every family."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES
from hf_fixtures import hf_logits

from rrt_jax import Decoder
from rrt_jax.model import LAYER_PATH, layer_tree
from rrt_jax.pretrained.hf import load_hf


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers(tiny_hf, family):
  directory, torch_model = tiny_hf[family]
  cfg, variables = load_hf(directory)
  assert cfg.family == family
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 13))
  ours, _ = Decoder(cfg).apply(variables, jnp.asarray(tokens))
  theirs = hf_logits(torch_model, tokens)
  assert np.abs(theirs).max() > 0.5  # Non-trivial logits, so a small |delta| means something.
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_family_specifics_are_read(tiny_hf):
  gemma, _ = load_hf(tiny_hf['gemma'][0])
  assert (gemma.norm, gemma.mlp, gemma.embed_scale, gemma.tie_embeddings) == ('rms_one_plus', 'geglu', True, True)
  assert gemma.num_kv_heads == 1
  llama, _ = load_hf(tiny_hf['llama'][0])
  assert (llama.norm, llama.mlp, llama.tie_embeddings, llama.rope_theta) == ('rms', 'swiglu', False, 5000.0)
  neox, _ = load_hf(tiny_hf['gpt_neox'][0])
  assert (neox.norm, neox.parallel_residual, neox.attn_bias, neox.rotary_dim) == ('layer', True, True, 2)


def test_mismatched_config_is_rejected(tiny_hf):
  cfg, _ = load_hf(tiny_hf['llama'][0])
  with pytest.raises(ValueError, match='does not match the config'):
    load_hf(tiny_hf['llama'][0], config=cfg.replace(mlp_dim=64))


def test_checkpoint_of_another_architecture_is_rejected(tiny_hf):
  llama_cfg, _ = load_hf(tiny_hf['llama'][0])
  with pytest.raises(ValueError, match='another architecture'):
    load_hf(tiny_hf['gpt_neox'][0], config=llama_cfg)


def test_leaves_are_placed_with_the_given_sharding(tiny_hf):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from rrt_jax.pretrained.hf import param_shapes
  cfg, _ = load_hf(tiny_hf['llama'][0])
  mesh = Mesh(np.array(jax.devices()[:1]), ('fsdp',))
  shardings = {path: NamedSharding(mesh, PartitionSpec('fsdp') if len(s.shape) == 3 else PartitionSpec())
               for path, s in param_shapes(cfg).items()}
  _, variables = load_hf(tiny_hf['llama'][0], shardings=shardings)
  kernel = layer_tree(variables['params'])['attn']['q']['kernel']
  assert kernel.sharding == shardings[LAYER_PATH + ('attn', 'q', 'kernel')]
