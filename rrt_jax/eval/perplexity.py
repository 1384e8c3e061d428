"""Perplexity at the exit of every loop, over sliding windows, counting each token exactly once."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrt_jax.model import Decoder
from rrt_jax.model.exits import confidence, first_exit, select_exit
from rrt_jax.model.scoring import cross_entropy


@dataclasses.dataclass(frozen=True)
class Windows:
  """Model inputs [N, window] and a 0/1 mask [N, window] of the positions whose next token is scored."""

  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.mask.sum())


def sliding_windows(ids: Sequence[int], window: int, stride: int | None = None, pad_id: int = 0) -> Windows:
  """Windows of `window` tokens every `stride` tokens; each window scores only the tokens no earlier window
  scored, so every token after the first is predicted once, with up to window - stride tokens of context."""
  stride = stride or window
  if not 0 < stride <= window:
    raise ValueError(f'stride must be in 1..window ({window}), got {stride}.')
  ids = np.asarray(ids, np.int32)
  if ids.size < 2:
    raise ValueError('Perplexity needs at least 2 tokens.')
  inputs, targets, masks = [], [], []
  scored_up_to = 0  # Index (into targets = ids[1:]) up to which tokens are already scored.
  start = 0
  while scored_up_to < ids.size - 1:
    chunk = ids[start:start + window + 1]
    n = chunk.size - 1
    inp = np.full(window, pad_id, np.int32)
    tgt = np.full(window, pad_id, np.int32)
    inp[:n], tgt[:n] = chunk[:-1], chunk[1:]
    mask = np.zeros(window, np.float32)
    mask[scored_up_to - start:n] = 1.0
    inputs.append(inp)
    targets.append(tgt)
    masks.append(mask)
    scored_up_to = start + n
    start += stride
  return Windows(np.stack(inputs), np.stack(targets), np.stack(masks))


@functools.lru_cache(maxsize=16)  # One jitted scorer per model (periodic eval while training calls it often).
def _nll_fn(model: Decoder):
  @jax.jit
  def nll(variables, inputs, targets, mask):
    logits, _ = model.apply(variables, inputs, all_exits=True)  # [E, b, s, V]
    return jnp.sum(cross_entropy(logits, targets) * mask[None], axis=(1, 2))  # [E]
  return nll


def per_loop_perplexity(model: Decoder, variables: dict, windows: Windows, batch_size: int = 1,
                        progress: bool = False) -> list[float]:
  """Perplexity of every exit (one per loop under CYCLE) over all scored tokens (no padding in the mean)."""
  nll = _nll_fn(model)
  pad = -len(windows.inputs) % batch_size  # Fully masked windows keep every batch the same shape.
  pad_rows = lambda x: np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])  # noqa: E731
  windows = Windows(pad_rows(windows.inputs), pad_rows(windows.targets), pad_rows(windows.mask))
  total = None
  starts = range(0, len(windows.inputs), batch_size)
  if progress:
    from tqdm import tqdm
    starts = tqdm(starts, desc='perplexity', unit='batch', leave=False)
  for i in starts:
    sl = slice(i, i + batch_size)
    out = np.asarray(nll(variables, windows.inputs[sl], windows.targets[sl], windows.mask[sl]), np.float64)
    total = out if total is None else total + out
  return [math.exp(x / windows.num_tokens) for x in total]


def early_exit_perplexity(model: Decoder, variables: dict, windows: Windows, thresholds: Sequence[float],
                          confidence_kind: str = 'max_prob', batch_size: int = 1) -> list[dict]:
  """Teacher-forced quality of confidence-based early exit: each token takes the logits of the first loop whose
  confidence reaches the threshold (else the last; the rule of rrt_jax.model.exits). Per threshold: perplexity
  and mean exit loop. The context is computed at full depth (no propagated K/V), so this isolates the exit
  decision's cost."""

  @jax.jit
  def per_loop(variables, inputs, targets):
    hidden, _ = model.apply(variables, inputs, method=Decoder.hidden_states)  # [E, b, s, D]
    logits = model.apply(variables, hidden, method=Decoder.logits)
    prev = jnp.concatenate([model.apply(variables, inputs, method=Decoder.embed)[None], hidden[:-1]])
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    conf = jnp.stack([confidence(confidence_kind, flat(logits[e]), flat(hidden[e]), flat(prev[e]))
                      for e in range(hidden.shape[0])]).reshape(logits.shape[:3])
    return cross_entropy(logits, targets), conf  # [E, b, s] each

  @functools.partial(jax.jit, static_argnums=2)
  def at_exit(ce_Exbxs, conf_Exbxs, threshold):
    exit_loop = first_exit(conf_Exbxs, threshold)  # [b, s]
    return select_exit(ce_Exbxs, exit_loop), exit_loop

  nll = np.zeros(len(thresholds))
  exit_sum = np.zeros(len(thresholds))
  for i in range(0, len(windows.inputs), batch_size):
    sl = slice(i, i + batch_size)
    ce, conf = per_loop(variables, windows.inputs[sl], jnp.asarray(windows.targets[sl]))
    mask = windows.mask[sl]
    for j, threshold in enumerate(thresholds):
      chosen, exit_loop = (np.asarray(x) for x in at_exit(ce, conf, float(threshold)))
      nll[j] += float((chosen * mask).sum())
      exit_sum[j] += float(((exit_loop + 1) * mask).sum())
  return [{'threshold': t, 'perplexity': math.exp(n / windows.num_tokens), 'mean_exit_loop': e / windows.num_tokens}
          for t, n, e in zip(thresholds, nll, exit_sum, strict=True)]


def heldout_windows(tokenizer, split: str, tokens: int, window: int = 512) -> Windows:
  """Windows over the first `tokens` tokens of a prepared corpus split ('austen', 'brown', 'wikipedia',
  'validation'; see rrt_jax.data.tfds_builder), documents joined with the tokenizer's eos_id."""
  from rrt_jax.data.tfds_builder import text_source
  source = text_source(split)
  ids = []
  for i in range(len(source)):
    ids += tokenizer.encode(source[i]['text'].decode()).ids + [tokenizer.eos_id]
    if len(ids) > tokens:
      break
  return sliding_windows(ids[:tokens + 1], window)
