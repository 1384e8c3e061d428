r"""Logit lens of the original model: perplexity of its hidden state after chosen layers, read through the final
norm and head, on held-out text. It bounds what a faithful conversion can give at an early exit before training.

  python -m experiments.logit_lens --depths=10,20,30
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.data import austen
from rrt_jax.eval.perplexity import sliding_windows
from rrt_jax.model.layerwise import apply_layer, depth_variables, embed
from rrt_jax.pretrained.gguf import load_gguf
from rrt_jax.pretrained.tokenizer import make_tokenizer
from rrt_jax.train.losses import cross_entropy

_DEPTHS = flags.DEFINE_list('depths', ['10', '20', '30'], 'Read the hidden state after these many layers.')
_BOOK = flags.DEFINE_string('book', 'Pride And Prejudice', 'Held-out Austen novel.')
_TOKENS = flags.DEFINE_integer('tokens', 4096, 'Scored tokens.')


def main(argv):
  del argv
  cfg, vanilla = load_gguf()
  tokenizer = make_tokenizer('smollm2')
  books, _ = austen.novels()
  windows = sliding_windows(tokenizer.encode(books[_BOOK.value]).ids[:_TOKENS.value + 1], 512)
  vanilla_rec = RecursionConfig()
  layer = jax.jit(lambda layer_vars, h: apply_layer(cfg, vanilla_rec, layer_vars, h)[0])
  nll_of = jax.jit(lambda h, t: cross_entropy(Decoder(cfg).apply(vanilla, h, method=Decoder.logits), t))
  depths = sorted(int(d) for d in _DEPTHS.value)
  nll = dict.fromkeys(depths, 0.0)
  for i in range(len(windows.inputs)):
    h = embed(cfg, vanilla, jnp.asarray(windows.inputs[i:i + 1]))
    for depth in range(depths[-1]):
      h = layer(depth_variables(vanilla, cfg, vanilla_rec, depth), h)
      if depth + 1 in nll:
        nll[depth + 1] += float((nll_of(h, jnp.asarray(windows.targets[i:i + 1])) * windows.mask[i:i + 1]).sum())
  for depth, total in nll.items():
    print(f'after layer {depth}: perplexity {math.exp(total / windows.num_tokens):,.2f}')


if __name__ == '__main__':
  app.run(main)
