r"""The decode step's matmuls alone, per weight format: what a weight-only quantised serving layout could buy here.

  python -m experiments.bench_matmul                       # SmolLM2-135M shapes, batch 1 and 4
  python -m experiments.bench_matmul --layers=4 --repeats=3  # quick

A chain of --layers Llama layers' projections (q, k, v, o, gate, up, down; per-layer weight buffers, as the
serving layout holds them) plus the tied vocabulary head, fed one activation row per batch row: the matmul work
of a batch-B decode step with nothing else. Each weight format is jitted alone and timed interleaved with the
others (median of --repeats):
  f32    float32 weights;
  bf16   bfloat16 weights, activations cast to bf16, f32 accumulation;
  int8   int8 weights with one f32 scale per output column, dequantised in the dot (x @ (w * s)), the form a fused
         weight-only int8 matmul takes.
Each row reports ms per chain, the GB/s of weight bytes read, and the ratio to the f32 chain and to the copy
bound (weight bytes / numpy copy bandwidth). Decoding is memory-bound at batch 1, so a format pays off only if
XLA reads its smaller weights without first converting them whole.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.hf_anchor import copy_bandwidth
from rrt_jax import presets
from rrt_jax.utils.timing import machine_description

_PRESET = flags.DEFINE_string('preset', 'smollm2_135m', 'Model shape (random weights).')
_LAYERS = flags.DEFINE_integer('layers', 0, 'Layers in the chain (0 = the preset\'s).')
_BATCHES = flags.DEFINE_list('batches', ['1', '4'], 'Activation rows.')
_FORMATS = flags.DEFINE_list('formats', ['f32', 'bf16', 'int8'], 'Weight formats to time.')
_REPEATS = flags.DEFINE_integer('repeats', 9, 'Timed runs per format (median).')


def layer_shapes(cfg) -> list[tuple[int, int]]:
  """[in, out] of one layer's projections, in order."""
  d, hd = cfg.d_model, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  return [(d, q), (d, kv), (d, kv), (q, d), (d, cfg.mlp_dim), (d, cfg.mlp_dim), (cfg.mlp_dim, d)]


def make_weights(cfg, layers: int, fmt: str, seed: int = 0) -> dict:
  """{'layers': [[weight per projection] per layer], 'head': [V, D]}; int8 weights are (int8, scale) pairs."""
  rng = np.random.default_rng(seed)

  def one(shape):
    w = rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
    if fmt == 'f32':
      return jnp.asarray(w)
    if fmt == 'bf16':
      return jnp.asarray(w, jnp.bfloat16)
    if fmt == 'int8':
      scale = np.abs(w).max(axis=0) / 127
      return jnp.asarray(np.round(w / scale), jnp.int8), jnp.asarray(scale, jnp.float32)
    raise ValueError(f'unknown weight format {fmt!r}: use f32, bf16 or int8.')

  return {'layers': [[one(s) for s in layer_shapes(cfg)] for _ in range(layers)],
          'head': one((cfg.d_model, cfg.vocab_size))}


def weight_bytes(weights: dict) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(weights))


def matmul(x_BxI: jax.Array, w) -> jax.Array:
  if isinstance(w, tuple):  # int8 with per-column scales.
    q, scale = w
    return jnp.dot(x_BxI, q.astype(jnp.float32) * scale, preferred_element_type=jnp.float32)
  return jnp.dot(x_BxI.astype(w.dtype), w, preferred_element_type=jnp.float32)


def chain(weights: dict, x_BxD: jax.Array) -> jax.Array:
  """Every projection of every layer, each feeding the next (the chain is data-dependent, so XLA can neither drop
  nor reorder the matmuls; K and V enter through their sums), then the head: [B, V]."""
  h = x_BxD
  for layer in weights['layers']:
    q, k, v, o, gate, up, down = layer
    attn = matmul(h, q) + 1e-3 * (matmul(h, k).sum(-1, keepdims=True) + matmul(h, v).sum(-1, keepdims=True))
    h = h + 1e-3 * matmul(attn, o)
    mlp = jax.nn.silu(matmul(h, gate)) * matmul(h, up)
    h = h + 1e-3 * matmul(mlp, down)
  return matmul(h, weights['head'])


def time_formats(cfg, layers: int, batch: int, formats: list[str], repeats: int) -> dict:
  """{format: {'ms', 'bytes'}}: median ms per chain, the formats timed round-robin."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, cfg.d_model)), jnp.float32)
  runs = {}
  for fmt in formats:
    weights = make_weights(cfg, layers, fmt)
    fn = jax.jit(chain)
    jax.block_until_ready(fn(weights, x))  # Compile.
    runs[fmt] = (fn, weights)
  times = {fmt: [] for fmt in formats}
  for _ in range(repeats):
    for fmt, (fn, weights) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(weights, x))
      times[fmt].append(time.perf_counter() - start)
  return {fmt: {'ms': 1e3 * statistics.median(times[fmt]), 'bytes': weight_bytes(runs[fmt][1])} for fmt in formats}


def main(argv):
  del argv
  cfg = presets.get(_PRESET.value)
  layers = _LAYERS.value or cfg.num_layers
  bandwidth = max(copy_bandwidth(threads=t) for t in (1, 2))
  print(f'# {machine_description()}; {_PRESET.value} shapes, {layers} layers + head, median of {_REPEATS.value}; '
        f'copy bandwidth {bandwidth / 1e9:.1f} GB/s')
  print(f'{"batch":>5} {"format":>6} {"MB":>8} {"ms":>8} {"GB/s":>7} {"x f32":>7} {"x bound":>8}')
  for batch in map(int, _BATCHES.value):
    res = time_formats(cfg, layers, batch, _FORMATS.value, _REPEATS.value)
    base = res.get('f32', next(iter(res.values())))['ms']
    for fmt, r in res.items():
      bound_ms = 1e3 * r['bytes'] / bandwidth
      print(f'{batch:>5} {fmt:>6} {r["bytes"] / 1e6:>8.1f} {r["ms"]:>8.2f} {r["bytes"] / r["ms"] / 1e6:>7.1f} '
            f'{r["ms"] / base:>7.2f} {r["ms"] / bound_ms:>8.2f}')


if __name__ == '__main__':
  app.run(main)
