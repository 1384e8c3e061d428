"""ModelConfig.attention: the no-cache path through jax.nn.dot_product_attention (and the splash kernel, in Pallas's
interpreter) gives the einsum's logits and gradients; the cache path stays the einsum; 'auto' resolves per backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.checkpoint import configs_from_json, configs_to_json
from rrt_jax.config import AttentionImpl
from rrt_jax.model import attention, init_cache, init_variables
from rrt_jax.model.attention import resolve_attention
from rrt_jax.serve.generate import generate

SEQ = 24
GQA = presets.TINY_LLAMA.replace(num_layers=2)  # 4 heads over 2 KV heads.
MQA = presets.TINY_GEMMA.replace(num_layers=2)  # One KV head.
RELAXED = RecursionConfig(loops=2, lora_rank=4)
MIDDLE = RecursionConfig(loops=1, looping='middle_cycle', unique_layers=1)  # The coda runs vmapped.


def packed_batch(seq: int, seed: int = 0):
  """Tokens, positions and segment ids of rows packed like the data pipeline: 2-3 documents per row, positions
  restarting in each, a padding tail of segment 0."""
  rng = np.random.default_rng(seed)
  cuts = [[seq // 3, seq // 2 + 2, seq], [seq // 2, seq - 3, seq]]  # Row 1 ends in 3 padding tokens.
  segments = np.zeros((2, seq), np.int32)
  positions = np.zeros((2, seq), np.int32)
  for row, ends in enumerate(cuts):
    start = 0
    for i, end in enumerate(ends):
      segments[row, start:end] = 0 if (row == 1 and i == 2) else i + 1
      positions[row, start:end] = np.arange(end - start)
      start = end
  tokens = rng.integers(0, 512, size=(2, seq))
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


@functools.cache
def model_and_variables(cfg, rec):
  return jax.tree.map(jnp.asarray, perturb(init_variables(cfg, rec, jax.random.key(0)), 0, 0.05))


def variable_shapes(cfg, rec):
  return jax.eval_shape(lambda: init_variables(cfg, rec, jax.random.key(0)))


def forward_and_grads(cfg, rec, variables, tokens, positions=None, segments=None):
  def loss(v):
    logits, _ = Decoder(cfg, rec).apply(v, tokens, positions, segments, all_exits=True)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  return logits, grads


def forward(cfg, rec, variables, *args):
  return jax.jit(lambda v, *a: Decoder(cfg, rec).apply(v, *a, all_exits=True)[0])(variables, *args)


def assert_same(got, expected, atol=1e-5):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4), got, expected)


def test_xla_gives_the_einsum_logits_and_gradients():
  """A relaxed GQA model on packed rows (the causal-only rows below run the same code with another mask)."""
  cfg, rec = GQA, RELAXED
  variables = model_and_variables(cfg, rec)
  args = packed_batch(SEQ)
  expected = forward_and_grads(cfg.replace(attention='einsum'), rec, variables, *args)
  got = forward_and_grads(cfg.replace(attention='xla'), rec, variables, *args)
  assert_same(got, expected)


def test_xla_gives_the_einsum_logits_of_other_layouts():
  """MIDDLE_CYCLE, whose coda runs under nn.vmap over exits; a relaxed Gemma (one KV head) on causal-only rows."""
  tokens, positions, segments = packed_batch(SEQ)
  for cfg, rec, packed in ((GQA.replace(num_layers=3), MIDDLE, True), (MQA, RELAXED, False)):
    variables = model_and_variables(cfg, rec)
    args = (tokens, positions, segments) if packed else (tokens,)
    logits = {impl: forward(cfg.replace(attention=impl), rec, variables, *args) for impl in ('einsum', 'xla')}
    assert_same(logits['xla'], logits['einsum'])


def program(cfg, rec, variables, *args, **kwargs) -> str:
  """The traced program of a forward pass (shapes suffice): equal programs give bit-for-bit equal results."""
  return str(jax.make_jaxpr(lambda v: Decoder(cfg, rec).apply(v, *args, **kwargs))(variables))


def test_auto_is_the_resolved_implementation_bit_for_bit():
  """On CPU 'auto' is today's einsum, unchanged."""
  variables = variable_shapes(GQA, RELAXED)
  tokens, positions, segments = packed_batch(SEQ)
  auto = program(GQA, RELAXED, variables, tokens, positions, segments)
  resolved = resolve_attention(GQA)
  assert auto == program(GQA.replace(attention=resolved), RELAXED, variables, tokens, positions, segments)
  other = 'einsum' if resolved == 'xla' else 'xla'
  assert auto != program(GQA.replace(attention=other), RELAXED, variables, tokens, positions, segments)


@pytest.mark.parametrize('packed', [False, True], ids=['causal', 'packed'])
def test_splash_kernel_in_the_interpreter_gives_xla(packed):
  """The splash kernel (Pallas's interpreter on CPU; S a multiple of 128) against jax.nn's XLA attention, which
  the model tests compare with the einsum; both take and return [B, S, heads, head_dim]: same wiring."""
  _, positions, segments = packed_batch(128)
  if not packed:
    positions, segments = jnp.broadcast_to(jnp.arange(128), (2, 128)), None
  mask = attention.self_mask(positions, segments)
  q, k, v = (jax.random.normal(key, (2, 128, heads, 16)) for key, heads in zip(
      jax.random.split(jax.random.key(0), 3), (4, 2, 2), strict=True))
  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  splash = functools.partial(attention.splash_attention, segment_ids_BxS=mask.segment_ids, interpret=True)
  xla = lambda q, k, v: attention.dot_product_attention('xla', q, k, v, mask)  # noqa: E731

  def out_and_grads(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)

  assert_same(out_and_grads(splash), out_and_grads(xla))


def test_splash_needs_a_multiple_of_128_and_auto_falls_back(monkeypatch):
  q = jnp.zeros((1, 24, 4, 16))
  with pytest.raises(ValueError, match='multiple of 128'):
    attention.splash_attention(q, q[:, :, :2], q[:, :, :2], None, interpret=True)
  monkeypatch.setattr(attention, 'resolve_attention', lambda cfg, backend=None: 'splash')
  assert attention._no_cache_impl(GQA, 24, packed=True) == 'xla'
  assert attention._no_cache_impl(GQA, 256, packed=True) == 'splash'


@pytest.mark.parametrize('dtype, gpu', [('float32', 'xla'), ('bfloat16', 'cudnn'), ('float16', 'cudnn')])
def test_auto_resolves_by_backend_and_dtype(dtype, gpu):
  cfg = GQA.replace(dtype=dtype)
  assert resolve_attention(cfg, 'cpu') == 'einsum'
  assert resolve_attention(cfg, 'tpu') == 'splash'
  assert resolve_attention(cfg, 'gpu') == gpu
  assert resolve_attention(cfg) == resolve_attention(cfg, jax.default_backend())
  for impl in ('einsum', 'xla'):
    assert resolve_attention(cfg.replace(attention=impl), 'gpu') == impl
  # Head dims cuDNN flash attention does not take on every GPU go to XLA.
  assert resolve_attention(cfg.replace(head_dim=256), 'gpu') == 'xla'
  assert resolve_attention(cfg.replace(head_dim=20), 'gpu') == 'xla'


def test_kernels_the_backend_cannot_run_are_one_clear_error():
  with pytest.raises(ValueError, match=r"attention='splash' .*needs a TPU.*'auto'.*'xla'"):
    resolve_attention(GQA.replace(attention='splash'), 'cpu')
  with pytest.raises(ValueError, match=r"attention='cudnn' needs a GPU.*'auto'.*'xla'"):
    resolve_attention(GQA.replace(attention='cudnn', dtype='bfloat16'), 'cpu')
  with pytest.raises(ValueError, match=r"attention='cudnn' needs dtype bfloat16 or float16"):
    resolve_attention(GQA.replace(attention='cudnn'), 'gpu')
  assert resolve_attention(GQA.replace(attention='splash'), 'tpu') == 'splash'
  assert resolve_attention(GQA.replace(attention='cudnn', dtype='bfloat16'), 'gpu') == 'cudnn'
  # Raised where the model is traced (on this backend), not only by resolve_attention.
  impossible = 'cudnn' if jax.default_backend() == 'tpu' else 'splash'
  with pytest.raises(ValueError, match=f"attention='{impossible}' .*needs a"):
    jax.eval_shape(Decoder(GQA.replace(attention=impossible)).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def test_the_config_field_validates_and_round_trips():
  with pytest.raises(ValueError, match=r"Unknown attention implementation 'flash': choose one of 'auto', 'einsum', "
                                       r"'xla', 'cudnn', 'splash'"):
    GQA.replace(attention='flash')
  assert GQA.attention == 'auto' and GQA.replace(attention='XLA').attention == AttentionImpl.XLA
  for impl in AttentionImpl:
    cfg = GQA.replace(attention=impl.value)
    data = configs_to_json(cfg, RELAXED)
    assert data['model']['attention'] == impl.value
    assert configs_from_json(data) == (cfg, RELAXED)
  old = configs_to_json(GQA.replace(attention='xla'), RELAXED)
  del old['model']['attention']  # A model_config.json written before the field existed.
  assert configs_from_json(old)[0].attention == AttentionImpl.AUTO


def test_the_cache_path_is_the_einsum_whatever_the_setting():
  cfg, rec = MQA, RELAXED
  variables = model_and_variables(cfg, rec)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 8)))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  cache = init_cache(cfg, rec, 2, 16)
  programs = {impl: program(cfg.replace(attention=impl), rec, variable_shapes(cfg, rec), tokens, positions, cache=cache)
              for impl in ('einsum', 'xla')}
  assert programs['xla'] == programs['einsum']  # Prefill into a cache: the same program, so the same bits.
  prompts = [[5, 17, 3], [9, 2, 44]]
  generated = [generate(Decoder(cfg.replace(attention=impl), rec), variables, prompts, max_new_tokens=3).tokens
               for impl in ('einsum', 'xla')]
  assert generated[0] == generated[1]
