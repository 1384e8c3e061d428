r"""An lm-eval-harness model, registered as `rrt_jax`: any of our checkpoints scored and generated at a chosen exit.

  import lm_eval
  import rrt_jax.eval.lm_eval  # noqa: F401  (registers 'rrt_jax' with lm-eval's model registry)
  lm_eval.simple_evaluate(model='rrt_jax', model_args='pretrained=workdir/main/uptrain,exit_loop=2',
                          tasks=['lambada_openai'])

model_args: `pretrained=<training workdir or rrt_jax.save directory>` (its latest checkpoint, or `step=N` of a
workdir; the tokenizer recorded in model_config.json) or `source=smollm2` (the packaged SmolLM2-135M);
`exit_loop` (1-based, default the last exit: scoring and generation at that loop's exit), `exit_threshold`
(confidence-based early exit in generate_until, among loops 1..exit_loop; 1 = never exit early), `confidence`,
`kv_fill` (see rrt_jax.model.exits.ExitConfig), `tokenizer` (a data.tokenizer spec instead of the recorded one),
`batch_size`, `max_length` (default the model's max_seq_len), `max_gen_toks` (default 256).

The work is done by our own functions, never re-derived here: loglikelihood and loglikelihood_rolling by
rrt_jax.eval.fewshot.loglikelihoods (requests sorted by length, padded to power-of-two buckets; one pass scores
every exit, and the scores of every exit are kept, so `at_exit(k)` views of one model re-score nothing),
(context, continuation) split by fewshot.encode_pair (lm-eval's rule), rolling windows by lm-eval's own
get_rolling_token_windows; generate_until by rrt_jax.serve.generate.generate with an ExitConfig, requests grouped
by generation arguments, sorted by prompt length and batched. An exit before the last generates with the model's
first `exit_loop` loops (the same shared weights and those loops' LoRA), which is what that exit computes.

Teacher-forced scores are at the fixed exit `exit_loop`; `exit_threshold` only changes generation.

lm-eval is optional: rrt_jax never imports this module, and without lm-eval installed the module still imports
but RRTLM raises an ImportError naming `pip install lm-eval`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np

from rrt_jax.checkpoint import Loaded, load_pretrained
from rrt_jax.eval import fewshot
from rrt_jax.model import Decoder, first_loops
from rrt_jax.model.exits import ExitConfig
from rrt_jax.pretrained.tokenizer import check_vocab, make_tokenizer, spec_of
from rrt_jax.serve.generate import SamplingConfig, generate, generator_for

log = logging.getLogger(__name__)

MODEL_NAME = 'rrt_jax'
LM_EVAL_VERSION = '0.4.13'  # The version pyproject's test extra pins and the tests run against.
INSTALL_HINT = f'pip install lm-eval=={LM_EVAL_VERSION}'
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until.

try:  # Optional: rrt_jax itself never needs lm-eval.
  # lm-eval registers its own models (hf, vllm, ...) only while its registry is empty: fill it first, so that
  # registering ours does not hide them in this process.
  import lm_eval.models  # noqa: F401
  from lm_eval.api.model import LM as _LMBase  # noqa: N811
  from lm_eval.api.registry import register_model as _register_model
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
  _IMPORT_ERROR = None
except ImportError as e:
  _LMBase, _register_model, _IMPORT_ERROR = object, None, e


def require_lm_eval() -> None:
  """Raises an ImportError naming the install command when lm-eval-harness is missing."""
  if _IMPORT_ERROR is not None:
    raise ImportError(f'The rrt_jax lm-eval-harness model needs lm-eval: {INSTALL_HINT} (the version the tests '
                      f'use; importing it failed with: {_IMPORT_ERROR}).') from _IMPORT_ERROR


# ------------------------------------------------------------------------------------------------- the model

def _args(request) -> tuple:
  """An lm_eval Instance's arguments, or the tuple itself (the API's (context, continuation) / (text,) /
  (context, gen_kwargs)); a bare string is (string,)."""
  if hasattr(request, 'args'):
    return request.args
  return (request,) if isinstance(request, str) else tuple(request)


def _key(ctx: Sequence[int], cont: Sequence[int]) -> tuple[int, bytes]:
  data = np.asarray(list(ctx) + list(cont), np.int64).tobytes()
  return len(ctx), hashlib.blake2b(data, digest_size=16).digest()


def _int_or_none(value, name: str) -> int | None:
  if value is None or value == '':
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if isinstance(value, bool) or not number.is_integer():
    raise ValueError(f'{name} must be an integer, got {value!r}.')
  return int(number)


class RRTLM(_LMBase):
  """lm-eval-harness model over one of our checkpoints (see the module docstring for the arguments). model=,
  variables= and tokenizer= (an object or a spec) take a model already in memory instead of a path."""

  def __init__(self, pretrained: str | None = None, source: str | None = None, step: int | None = None,
               tokenizer=None, exit_loop: int | None = None, exit_threshold: float = 1.0,
               confidence: str = 'max_prob', kv_fill: str = 'propagate', batch_size: int | str | None = None,
               max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, decode: str = 'vmapped',
               progress: bool = True, model: Decoder | None = None, variables: dict | None = None,
               max_batch_size: int | None = None, device: str | None = None, **unused):
    require_lm_eval()
    super().__init__()
    if unused:
      log.warning('%s ignores model_args %s.', MODEL_NAME, sorted(unused))
    if device:
      log.info('%s runs where jax runs (%s): device=%r is not used.', MODEL_NAME, jax.default_backend(), device)
    del max_batch_size  # No automatic batch size search: batch_size is used as given.
    if model is not None:
      if variables is None or tokenizer is None or pretrained is not None or source is not None:
        raise ValueError('model= needs variables= and tokenizer=, and no pretrained= or source=.')
      tok = make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
      check_vocab(tok, model.cfg.vocab_size, MODEL_NAME)
      loaded = Loaded(model, variables, tok, {'in_memory': f'{model.cfg.family} loops={model.rec.loops}'})
    else:
      loaded = load_pretrained(pretrained, source, _int_or_none(step, 'step'), tokenizer)
    self.model, self.variables, self.tokenizer = loaded.model, loaded.variables, loaded.tokenizer
    self.description = loaded.description
    self.num_exits = self.model.rec.num_exits
    self.batch_size = self._batch_size(batch_size)
    self._max_length = _int_or_none(max_length, 'max_length') or self.model.cfg.max_seq_len
    if not 2 <= self._max_length <= self.model.cfg.max_seq_len:
      raise ValueError(f'max_length must be in [2, {self.model.cfg.max_seq_len}] (the model\'s max_seq_len), got '
                       f'{self._max_length}.')
    self.max_gen_toks = _int_or_none(max_gen_toks, 'max_gen_toks') or DEFAULT_MAX_GEN_TOKS
    self.exit_cfg = ExitConfig(float(exit_threshold), confidence, kv_fill)
    self.decode, self.progress = decode, bool(progress)
    self.exit_loop = self._check_exit(self.num_exits if exit_loop is None else _int_or_none(exit_loop, 'exit_loop'))
    # Shared by every at_exit view: all-exit scores per request, cut models.
    self._scores: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}
    self._cut: dict[int, tuple[Decoder, dict]] = {}

  @staticmethod
  def _batch_size(batch_size) -> int:
    if batch_size is None or batch_size == '':
      return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.startswith('auto'):
      log.warning('%s has no automatic batch size: batch_size=%r runs with %d.', MODEL_NAME, batch_size,
                  DEFAULT_BATCH_SIZE)
      return DEFAULT_BATCH_SIZE
    size = _int_or_none(batch_size, 'batch_size')
    if size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size!r}.')
    return size

  def _check_exit(self, exit_loop: int) -> int:
    if not 1 <= exit_loop <= self.num_exits:
      raise ValueError(f'exit_loop must be in 1..{self.num_exits} (the model\'s exits, 1-based), got {exit_loop}.')
    return exit_loop

  def at_exit(self, exit_loop: int) -> RRTLM:
    """A view of this model at another exit, sharing its weights and every score already computed."""
    view = copy.copy(self)
    view.exit_loop = self._check_exit(int(exit_loop))
    return view

  # -- lm-eval's model interface

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    """What an empty context or a rolling text is conditioned on (lm-eval's convention: the end-of-text token)."""
    return self.eot_token_id

  @property
  def tokenizer_name(self) -> str:
    return spec_of(self.tokenizer) or type(self.tokenizer).__name__

  def get_model_info(self) -> dict:
    rec = self.model.rec
    return {'model': MODEL_NAME, **self.description, 'exit_loop': self.exit_loop, 'num_exits': self.num_exits,
            'loops': rec.loops, 'looping': rec.looping.value, 'lora_rank': rec.lora_rank,
            'exit_threshold': self.exit_cfg.threshold, 'confidence': self.exit_cfg.confidence,
            'kv_fill': self.exit_cfg.kv_fill}

  def tok_encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text).ids)

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids))

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if context == '':  # lm-eval: condition on the prefix token (unless the continuation starts with it).
      cont = self.tok_encode(continuation)
      if not cont:
        raise ValueError('An empty context with an empty continuation has nothing to score.')
      return ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
    return fewshot.encode_pair(self.tokenizer, context, continuation)

  def _score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str) -> tuple[np.ndarray,
                                                                                             np.ndarray]:
    """(log-likelihood [E, N], greedy [E, N]) of (context ids, continuation ids) pairs at every exit, scoring
    only the pairs no earlier call (at any exit) scored, in one batched and bucketed pass."""
    keys = [_key(c, t) for c, t in pairs]
    todo = {}
    for k, pair in zip(keys, pairs, strict=True):
      if k not in self._scores and k not in todo:
        todo[k] = pair
    if todo:
      ll, greedy = fewshot.loglikelihoods(self.model, self.variables, list(todo.values()), self.batch_size,
                                          self.max_length, self.progress, desc=desc)
      for j, k in enumerate(todo):
        self._scores[k] = (ll[:, j], greedy[:, j])
    if not keys:
      return np.zeros((self.num_exits, 0)), np.zeros((self.num_exits, 0), bool)
    return (np.stack([self._scores[k][0] for k in keys], 1), np.stack([self._scores[k][1] for k in keys], 1))

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) at exit `exit_loop`."""
    del disable_tqdm
    args = [_args(r) for r in requests]
    ll, greedy = self._score([self._pair(ctx, cont) for ctx, cont in args], 'loglikelihood')
    e = self.exit_loop - 1
    out = [(float(ll[e, i]), bool(greedy[e, i])) for i in range(len(args))]
    for a, o in zip(args, out, strict=True):
      self.cache_hook.add_partial('loglikelihood', a, o)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Total log-likelihood of each text given the prefix token, every token predicted once in lm-eval's rolling
    windows of max_length (the last window with full context)."""
    del disable_tqdm
    texts = [_args(r)[0] for r in requests]
    pairs, owner = [], []
    for i, text in enumerate(texts):
      windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                          max_seq_len=self.max_length, context_len=1)
      for ctx, cont in map(make_disjoint_window, windows):
        pairs.append((ctx, cont))
        owner.append(i)
    ll, _ = self._score(pairs, 'loglikelihood_rolling')
    totals = np.zeros(len(texts), np.float64)
    np.add.at(totals, np.asarray(owner, np.int64), ll[self.exit_loop - 1])
    out = [float(t) for t in totals]
    for text, o in zip(texts, out, strict=True):
      self.cache_hook.add_partial('loglikelihood_rolling', (text,), o)
    return out

  # -- generation

  def _generation_model(self) -> tuple[Decoder, dict]:
    if self.exit_loop not in self._cut:
      self._cut[self.exit_loop] = first_loops(self.model, self.variables, self.exit_loop)
    return self._cut[self.exit_loop]

  def _stop_token(self, stop: str) -> int | None:
    """The id of a stop string that is exactly one token: generation may stop at it (the text is cut there)."""
    ids = self.tok_encode(stop)
    return ids[0] if len(ids) == 1 and self.tokenizer.decode(ids) == stop else None

  def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, SamplingConfig]:
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop('until', None)
    until = [until] if isinstance(until, str) else list(until or [])
    eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
    if eos and eos not in until:
      until.append(eos)
    max_gen = _int_or_none(kwargs.pop('max_gen_toks', self.max_gen_toks), 'max_gen_toks')
    if max_gen < 1:
      raise ValueError(f'max_gen_toks must be >= 1, got {max_gen}.')
    do_sample = bool(kwargs.pop('do_sample', False))
    temperature = float(kwargs.pop('temperature', 1.0 if do_sample else 0.0))
    top_k, top_p = int(kwargs.pop('top_k', 0) or 0), float(kwargs.pop('top_p', 1.0) or 1.0)
    seed = int(kwargs.pop('seed', 0) or 0)
    if kwargs:
      log.warning('%s generate_until ignores gen_kwargs %s.', MODEL_NAME, sorted(kwargs))
    if not do_sample or temperature <= 0:
      sampling = SamplingConfig(seed=seed)  # Greedy.
    else:
      sampling = SamplingConfig(temperature, top_k, top_p, seed)
    return until, max_gen, sampling

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Generation from each context with our early-exit generator (at exit `exit_loop`, early exit by
    exit_threshold), until a stop string (`until`, and the end-of-text token) or max_gen_toks tokens."""
    args = [_args(r) for r in requests]
    groups: dict[str, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(args):
      groups.setdefault(json.dumps(gen_kwargs or {}, sort_keys=True, default=str), []).append(i)
    model, variables = self._generation_model()
    out: list[str | None] = [None] * len(args)
    batches = []
    for indices in groups.values():
      until, max_gen, sampling = self._gen_settings(args[indices[0]][1])
      max_gen = min(max_gen, self.max_length - 1)  # At least one context token.
      budget = self.max_length - max_gen
      prompts = {}
      for i in indices:  # The most recent context tokens that fit beside max_gen new ones (lm-eval's truncation).
        ids = self.tok_encode(args[i][0])[-budget:]
        prompts[i] = ids or [self.prefix_token_id]
      order = sorted(indices, key=lambda i: (-len(prompts[i]), i))  # Like lengths share a batch and its bucket.
      stops = sorted({t for t in map(self._stop_token, until) if t is not None} | {self.eot_token_id})
      for b in range(0, len(order), self.batch_size):
        batches.append((order[b:b + self.batch_size], prompts, until, max_gen, sampling, stops))
    if self.progress and not disable_tqdm:
      from tqdm import tqdm
      batches = tqdm(batches, desc='generate_until', unit='batch', leave=False)
    for idx, prompts, until, max_gen, sampling, stops in batches:
      rows = [prompts[i] for i in idx]
      rows += [rows[0]] * (self.batch_size - len(rows))  # Full batches: one compiled shape per bucket.
      gen = generate(model, variables, rows, max_gen, sampling=sampling, exit_cfg=self.exit_cfg, stop_tokens=stops,
                     generator=generator_for(model, self.exit_cfg, sampling, self.decode))
      for r, i in enumerate(idx):
        text = self.tokenizer.decode(gen.tokens[r])
        for stop in until:
          if stop:
            text = text.split(stop)[0]
        out[i] = text
        self.cache_hook.add_partial('generate_until', args[i], text)
    return out


if _register_model is not None:
  RRTLM = _register_model(MODEL_NAME)(RRTLM)


__all__ = ['INSTALL_HINT', 'LM_EVAL_VERSION', 'MODEL_NAME', 'RRTLM', 'require_lm_eval']
