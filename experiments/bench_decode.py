r"""Decode speed against the default baseline and the hardware: our generate() vs HF transformers generate on the
same weights and the same CPU, each against the memory-bandwidth bound, and the relaxed model under CSB.

  python -m experiments.bench_decode                          # SmolLM2-135M (packaged), batch 1 and 4
  python -m experiments.bench_decode --tiny --new_tokens=8 --repeats=1 --hf=false     # the plumbing (tiny model)

In one run, median of --repeats after a warm-up (compilation):
  * ours: greedy generate() (no exit) at each --batches, in the per-layer serving layout (the default, with fused
    q/k/v and gate/up kernels), the same without the fusion (ModelConfig.fuse_projections=False) and the stacked
    training layout (what decoding read before); decode tok/s = generated tokens / (time of a
    --new_tokens call - time of a 1-token call), so prefill and the layout conversion cancel. The layouts take
    turns within each repeat, so the machine's drift moves them together, not their ratios.
  * HF transformers LlamaForCausalLM.generate (greedy, fp32) on our exact weights, in its own process
    (experiments/hf_anchor.py), at the same batches and --hf_threads; its tokens must equal ours.
  * the bound: bytes a batch-1 token must read (parameters + KV cache) / measured bandwidth, the better of 1 and 2
    threads, by two probes: a numpy copy (read + write counted, as STREAM's copy; the bound of earlier runs) and a
    read-only one (a dot product of a large array with itself, as decoding reads its weights; the tighter).
  * the relaxed model (R = --loops, Average + SVD LoRA rank --rank) without exit against the vanilla model, both
    through the Engine with sequence-wise batching (CSB) at --slots slots: decode tok/s and their ratio.
  * quality beside speed: each model's perplexity on --eval_tokens held-out tokens (Pride and Prejudice).
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from experiments import hf_anchor
from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.eval.perplexity import per_loop_perplexity, sliding_windows
from rrt_jax.model import init_variables
from rrt_jax.serve.engine import Engine, EngineConfig, Request
from rrt_jax.serve.generate import ExitConfig, Generator, generate, serving_variables
from rrt_jax.utils.buckets import bucket
from rrt_jax.utils.timing import machine_description
from rrt_jax.utils.xla_cpu import prefer_ynn_dots

_TINY = flags.DEFINE_bool('tiny', False, 'A random tiny Llama instead of SmolLM2 (a plumbing check).')
_BATCHES = flags.DEFINE_list('batches', ['1', '4'], 'Rows decoded together.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32, 'Generated tokens per row.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (median).')
_HF = flags.DEFINE_bool('hf', True, 'Time HF transformers generate (needs torch + transformers).')
_HF_THREADS = flags.DEFINE_list('hf_threads', ['2'], 'torch threads for HF.')
_LOOPS = flags.DEFINE_integer('loops', 3, 'Loops of the relaxed model.')
_RANK = flags.DEFINE_integer('rank', 64, 'LoRA rank of the relaxed model.')
_SLOTS = flags.DEFINE_integer('slots', 4, 'Engine slots for the CSB comparison.')
_REQUESTS = flags.DEFINE_integer('requests', 8, 'Requests served in the CSB comparison.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 1024, 'Held-out tokens for the perplexities.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')


def _source():
  """(cfg, vanilla variables, prompt source ids, held-out ids)."""
  if _TINY.value:
    cfg = presets.TINY_LLAMA
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, 4096).tolist()
    return cfg, init_variables(cfg, RecursionConfig(), jax.random.key(0)), ids, ids[-_EVAL_TOKENS.value - 1:]
  from rrt_jax.data import austen
  from rrt_jax.pretrained.gguf import load_gguf, load_tokenizer
  cfg, vanilla = load_gguf()
  tokenizer, (books, _) = load_tokenizer(), austen.novels()
  held_out = tokenizer.encode(books['Pride And Prejudice']).ids[:_EVAL_TOKENS.value + 1]
  return cfg, vanilla, tokenizer.encode(books['Emma']).ids, held_out


def _prompts(ids: list[int], count: int) -> list[list[int]]:
  starts = np.random.default_rng(1).integers(0, len(ids) - _PROMPT_LEN.value, count)
  return [ids[s:s + _PROMPT_LEN.value] for s in starts]


# The layouts ours() times: (label, layer layout, fused projections).
LAYOUTS = (('per_layer', 'per_layer', True), ('unfused', 'per_layer', False), ('stacked', 'stacked', False))


def ours(model: Decoder, variables: dict, prompts: list[list[int]]) -> dict:
  """Greedy no-exit generate() in each of LAYOUTS: {label: decode tok/s (the 1-token call subtracted), ms per step
  and the tokens}. The layouts are timed in turn within each repeat (medians of --repeats), so a change of the
  machine's speed during the run moves all of them, not their ratios."""
  runs = {}
  for label, layout, fuse in LAYOUTS:
    served = model.clone(cfg=model.cfg.replace(fuse_projections=fuse))
    gen = Generator(served, ExitConfig(threshold=1.0))
    served, served_vars = serving_variables(served, variables, layout)  # Once: generate() converts every call.
    runs[label] = functools.partial(generate, served, served_vars, prompts, generator=gen, layer_layout=layout)
  tokens = {label: run(_NEW_TOKENS.value).tokens for label, run in runs.items()}  # Also compiles both lengths.
  for run in runs.values():
    run(1)
  times = {label: ([], []) for label in runs}
  for _ in range(_REPEATS.value):
    for label, run in runs.items():
      for n, out in zip((_NEW_TOKENS.value, 1), times[label], strict=True):
        start = time.perf_counter()
        run(n)
        out.append(time.perf_counter() - start)
  rows = {}
  for label, (full, first) in times.items():
    decode_s = statistics.median(full) - statistics.median(first)
    rows[label] = {'decode_tokens_per_s': len(prompts) * (_NEW_TOKENS.value - 1) / decode_s,
                   'ms_per_step': 1000 * decode_s / (_NEW_TOKENS.value - 1), 'tokens': tokens[label]}
  return rows


def csb_tokens_per_s(model: Decoder, variables: dict, prompts: list[list[int]]) -> float:
  """Engine decode tok/s, sequence-wise batching, no exit: median of --repeats after a warm-up pass."""
  max_len = bucket(_PROMPT_LEN.value + _NEW_TOKENS.value)  # generate()'s cache length for these requests.
  engine = Engine(model, variables, EngineConfig(slots=_SLOTS.value, max_len=max_len, depthwise=False,
                                                 exit=ExitConfig(threshold=1.0)))
  requests = [Request(p, _NEW_TOKENS.value) for p in prompts]
  engine.run(requests)
  return statistics.median(engine.run(requests)[1].decode_tokens_per_s for _ in range(_REPEATS.value))


def main(argv):
  del argv
  prefer_ynn_dots()  # Before the backend starts (rrt_jax.utils.xla_cpu).
  machine = machine_description()
  print(f'# decode benchmark on {machine}: prompt {_PROMPT_LEN.value}, {_NEW_TOKENS.value} new tokens, greedy, '
        f'median of {_REPEATS.value}', flush=True)
  cfg, vanilla, ids, held_out = _source()
  windows = sliding_windows(held_out, min(512, cfg.max_seq_len))
  vanilla_model = Decoder(cfg)
  rec = RecursionConfig(loops=_LOOPS.value, init='average', lora_rank=_RANK.value)
  relaxed_model, relaxed = Decoder(cfg, rec), to_recursive(vanilla, cfg, rec)
  ppl = {'vanilla': per_loop_perplexity(vanilla_model, vanilla, windows)[-1],
         'relaxed': per_loop_perplexity(relaxed_model, relaxed, windows)[-1]}
  results = {'machine': machine, 'perplexity': ppl, 'batches': {}}
  copy_bw = max(hf_anchor.copy_bandwidth(threads=t) for t in (1, 2))
  read_bw = max(hf_anchor.read_bandwidth(threads=t) for t in (1, 2))
  need = hf_anchor.decode_bytes_per_token(cfg, RecursionConfig(), vanilla, _PROMPT_LEN.value + _NEW_TOKENS.value)
  bound_ms, read_bound_ms = (1000 * need['total_bytes'] / bw for bw in (copy_bw, read_bw))
  results['bound'] = {'bytes_per_token': need['total_bytes'], 'copy_bandwidth': copy_bw, 'ms': bound_ms,
                      'read_bandwidth': read_bw, 'read_ms': read_bound_ms}
  print(f'bound: {need["total_bytes"] / 1e6:.0f} MB per batch-1 token / {copy_bw / 1e9:.1f} GB/s (copy) = '
        f'{bound_ms:.1f} ms; / {read_bw / 1e9:.1f} GB/s (read) = {read_bound_ms:.1f} ms', flush=True)
  batches = [int(b) for b in _BATCHES.value]
  for batch in batches:
    prompts = _prompts(ids, batch)
    row = ours(vanilla_model, vanilla, prompts)
    assert all(row[label]['tokens'] == row['stacked']['tokens'] for label, _, _ in LAYOUTS), \
        'the layouts generated different tokens'
    results['batches'][batch] = row
  if _HF.value:
    for batch in batches:
      prompts = _prompts(ids, batch)
      hf = hf_anchor.hf_anchor_rows(cfg, vanilla, prompts, _NEW_TOKENS.value, [batch],
                                    [int(t) for t in _HF_THREADS.value], _REPEATS.value)
      mine = results['batches'][batch]['per_layer']['tokens']
      for r in hf:
        r['same_tokens'] = r.pop('tokens') == mine
      results['batches'][batch]['hf'] = hf
  relaxed_csb = csb_tokens_per_s(relaxed_model, relaxed, _prompts(ids, _REQUESTS.value))
  vanilla_csb = csb_tokens_per_s(vanilla_model, vanilla, _prompts(ids, _REQUESTS.value))
  results['csb'] = {'vanilla': vanilla_csb, 'relaxed': relaxed_csb, 'ratio': relaxed_csb / vanilla_csb}
  print(f'\nvanilla ppl {ppl["vanilla"]:.2f}; relaxed R={rec.loops} r={rec.lora_rank} (converted) ppl '
        f'{ppl["relaxed"]:.1f}\n\n| batch | ours per-layer tok/s | ms/step | x bound: copy, read (batch 1) | '
        'unfused tok/s (ms/step) | ours stacked tok/s | '
        'HF tok/s (threads) | ours / HF | same tokens |\n|---|---|---|---|---|---|---|---|---|')
  for batch, row in results['batches'].items():
    p, u, s = row['per_layer'], row['unfused'], row['stacked']
    hf = row.get('hf', [])
    hf_text = ', '.join(f'{r["decode_tokens_per_s"]:.1f} ({r["threads"]})' for r in hf) or '-'
    ratio = ', '.join(f'{p["decode_tokens_per_s"] / r["decode_tokens_per_s"]:.2f}x' for r in hf) or '-'
    same = ', '.join(str(r['same_tokens']) for r in hf) or '-'
    bound = f'{p["ms_per_step"] / bound_ms:.2f}x, {p["ms_per_step"] / read_bound_ms:.2f}x' if batch == 1 else '-'
    print(f'| {batch} | {p["decode_tokens_per_s"]:.1f} | {p["ms_per_step"]:.1f} | {bound} | '
          f'{u["decode_tokens_per_s"]:.1f} ({u["ms_per_step"]:.1f}) | {s["decode_tokens_per_s"]:.1f} | {hf_text} | '
          f'{ratio} | {same} |')
  print(f'\nCSB at {_SLOTS.value} slots, {_REQUESTS.value} requests, no exit: vanilla {vanilla_csb:.1f} tok/s '
        f'(ppl {ppl["vanilla"]:.2f}), relaxed {relaxed_csb:.1f} tok/s (ppl {ppl["relaxed"]:.1f}): '
        f'x{relaxed_csb / vanilla_csb:.2f}', flush=True)
  if _OUT.value:
    for row in results['batches'].values():
      for label, _, _ in LAYOUTS:
        row[label].pop('tokens')
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)
