"""Few-shot log-likelihood scoring: real BIG-bench / Austen-LastWord items, parity with transformers on SmolLM2,
batched + bucketed scoring equal to per-item scoring, acc vs acc_norm, and one metrics dict per loop."""

import functools
import json
import os
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.data import bigbench, prepare
from rrt_jax.data.bigbench import MultipleChoice
from rrt_jax.data.byte_tokenizer import ByteTokenizer
from rrt_jax.eval import austen_lastword, fewshot
from rrt_jax.eval.austen_lastword import Cloze
from rrt_jax.model import init_variables
from rrt_jax.utils.buckets import bucket

# Facts of the pinned bigbench==1.0.0 sdist: (items, choices per item).
EXPECTED = {'bb_wikihow_step': (2250, {4}), 'bb_social_iqa': (1954, {2, 3}), 'bb_winogrande_objects': (8994, {2}),
            'bb_winogrande_persons': (12998, {2})}


# ----------------------------------------------------------------------------------------------- real data

@pytest.fixture(scope='module')
def bb_tasks():
  return {name: fewshot.load_task(name) for name in bigbench.TASKS}


@pytest.mark.parametrize('name', bigbench.TASKS)
def test_bigbench_items_parse(bb_tasks, name):
  task = bb_tasks[name]
  items = task.items + task.pool
  count, sizes = EXPECTED[name]
  assert len(items) == count and task.kind == fewshot.MULTIPLE_CHOICE
  assert {len(it.choices) for it in items} == sizes
  assert all(0 <= it.gold < len(it.choices) and it.context.strip() for it in items)
  assert all(c and c == c.strip() for it in items for c in it.choices)
  assert len({it.id for it in items}) == len(items)
  # The pool is a held-back ~10% of groups, disjoint from the scored items.
  assert 0.05 < len(task.pool) / len(items) < 0.15
  assert not {it.group for it in task.pool} & {it.group for it in task.items}


def test_bigbench_item_contents(bb_tasks):
  by_id = {it.id: it for t in bb_tasks.values() for it in t.items + t.pool}
  wiki = by_id['bb_wikihow_step/0']
  assert wiki.context == "The most reasonable step of 'Solve an Algebraic Expression' is"
  assert wiki.choices[wiki.gold] == 'Know the order of operations'
  siqa = by_id['bb_social_iqa/0']
  assert siqa.context.startswith('Q: Tracy') and siqa.context.endswith('before this?\nA:')
  assert siqa.choices[siqa.gold] == 'Find somewhere to go'
  # A twin pair: same options, opposite answers, the option fills the blank and the rest is scored.
  a, b = (by_id[f'bb_winogrande_objects/0/{k}'] for k in (1, 2))
  assert a.choices == b.choices == ('holes', 'spaces') and (a.gold, b.gold) == (0, 1) and a.group == b.group
  assert a.solved() == 'The rats fled their holes for the open spaces since the holes were crowded for them.'
  assert a.requests()[1] == ('The rats fled their holes for the open spaces since the spaces',
                             ' were crowded for them.')
  persons = bb_tasks['bb_winogrande_persons'].items
  assert all(re.fullmatch(r'(?i)person ?[xy]', c) for it in persons for c in it.choices)
  for it in bb_tasks['bb_winogrande_objects'].items + persons:
    assert it.suffix and '_' not in it.context + it.suffix
    assert all(c.lower() in (it.context + it.suffix).lower() for c in it.choices)


def test_only_the_needed_task_files_are_extracted(bb_tasks):
  del bb_tasks
  base = os.path.join(os.path.dirname(bigbench.sdist_path()), 'tasks')
  found = {os.path.relpath(os.path.join(d, f), base) for d, _, files in os.walk(base) for f in files}
  assert found == {f for files in bigbench.TASK_FILES.values() for f in files}


@pytest.fixture(scope='module')
def austen_docs():
  prepare.prepare()
  with open(os.path.join(prepare.prepared_dir(), 'austen.jsonl'), encoding='utf-8') as f:
    return {d['id']: d['text'] for d in map(json.loads, f)}


def test_austen_lastword_comes_from_the_held_out_split(austen_docs):
  task = fewshot.load_task('austen_lastword')
  items = task.items + task.pool
  assert task.kind == fewshot.CLOZE and len(items) > 1500
  words = {doc: text.split() for doc, text in austen_docs.items()}
  last = {}
  for it in sorted(items, key=lambda it: (it.id.rsplit('/', 2)[1], int(it.id.rsplit('/', 1)[1]))):
    _, doc, index = it.id.rsplit('/', 2)
    index = int(index)
    assert doc in words, f'{it.id}: not a book of the held-out Austen split'
    context = it.context.split()
    assert austen_lastword.MIN_CONTEXT <= len(context) <= austen_lastword.MAX_CONTEXT
    assert words[doc][index - len(context):index] == context  # Exactly the words before the target...
    assert words[doc][index].startswith(it.target) and words[doc][index][len(it.target)] in '.!?;'
    assert it.target.lower() in {re.sub(r'[^A-Za-z]', '', w).lower() for w in context}  # ...which hold it.
    assert it.target.lower() not in austen_lastword.STOPWORDS | austen_lastword.ABBREVIATIONS
    assert index - len(context) > last.get(doc, -1)  # Items never overlap.
    last[doc] = index
  # Deterministic for a seed; another seed draws other context lengths.
  docs = sorted(austen_docs.items())[:1]
  assert austen_lastword.build(docs, seed=1) == austen_lastword.build(docs, seed=1)
  assert austen_lastword.build(docs, seed=1) != austen_lastword.build(docs, seed=2)


def test_austen_lastword_is_not_in_training_text(austen_docs):
  del austen_docs
  task = fewshot.load_task('austen_lastword')
  probes = [' '.join(it.context.split()[-12:]) for it in fewshot.subset(task.items, 40)]
  with open(os.path.join(prepare.prepared_dir(), 'train.jsonl'), encoding='utf-8') as f:
    train = ' '.join(' '.join(json.loads(line)['text'].split()) for line in f)
  assert not [p for p in probes if p in train]


# ------------------------------------------------------------------------------ prompts and tokenisation

def _mc(i: int, group: str | None = None) -> MultipleChoice:
  return MultipleChoice(f't/{i}', group or f'g{i}', f'Question {i}?', ('yes', 'no'), i % 2)


def test_fewshot_prompts_are_seeded_and_never_use_the_item():
  pool = [_mc(i) for i in range(20)] + [_mc(99, group='g0')]
  item = _mc(0)
  prefix = fewshot.fewshot_prefix(item, pool, 5, seed=3)
  shots = prefix.split(fewshot.SHOT_DELIMITER)[:-1]
  assert len(shots) == 5 and prefix.endswith(fewshot.SHOT_DELIMITER)
  assert all(s in {p.solved() for p in pool} for s in shots)
  assert 'Question 0?' not in prefix and 'Question 99?' not in prefix  # Neither the item nor its group.
  assert fewshot.fewshot_prefix(item, pool, 5, seed=3) == prefix
  assert fewshot.fewshot_prefix(item, pool, 5, seed=4) != prefix
  assert fewshot.fewshot_prefix(_mc(1), pool, 5, seed=3) != prefix
  assert fewshot.fewshot_prefix(item, pool, 0) == ''
  with pytest.raises(ValueError, match='lower num_shots'):
    fewshot.fewshot_prefix(item, pool, 20)
  assert fewshot.subset(pool, 4, seed=0) == fewshot.subset(pool, 10, seed=0)[:4]


@pytest.fixture(scope='module')
def smollm2_tokenizer():
  from rrt_jax.convert.gguf import load_tokenizer
  return load_tokenizer()


def test_encode_pair_splits_like_lm_eval(smollm2_tokenizer):
  tok = smollm2_tokenizer
  for context, continuation in [('The capital of France is', ' Paris'), ('Q: Why?\nA:', ' Because it rained'),
                                ('It was a hot day and the ', 'sun was bright.')]:
    ctx, cont = fewshot.encode_pair(tok, context, continuation)
    assert ctx + cont == tok.encode(context + continuation).ids
    assert ctx == tok.encode(context.rstrip()).ids  # The trailing space moved to the continuation.
  _, cont = fewshot.encode_pair(tok, 'It was a hot day and the ', 'sun')
  assert tok.decode(cont) == ' sun'
  with pytest.raises(ValueError, match='non-empty context'):
    fewshot.encode_pair(tok, '', 'word')


def test_unknown_task_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"choose from \['austen_lastword', 'bb_social_iqa'"):
    fewshot.load_task('hellaswag')


# ------------------------------------------------------------------- tiny models: batching, metrics, loops

@pytest.fixture(scope='module')
def tiny():
  cfg = presets.TINY_LLAMA.replace(max_seq_len=128)
  return cfg, init_variables(cfg, RecursionConfig(), jax.random.key(0))


@functools.lru_cache(maxsize=4)
def _jit_apply(model):
  return jax.jit(model.apply, static_argnames='all_exits')


def _reference(model, variables, requests, max_length):
  """Per-item, unbatched, from the full [E, 1, S, V] logits of Decoder.__call__(all_exits=True)."""
  lls, greedy = [], []
  for ctx, cont in requests:
    full = (list(ctx) + list(cont))[-(max_length + 1):]
    logits, _ = _jit_apply(model)(variables, jnp.asarray([full[:-1]]), all_exits=True)
    logits = logits[:, 0, -len(cont):]
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    lls.append(logp[:, np.arange(len(cont)), cont].sum(-1))
    greedy.append((np.asarray(logits).argmax(-1) == np.asarray(cont)).all(-1))
  return np.stack(lls, 1), np.stack(greedy, 1)


def test_batched_bucketed_loglikelihood_equals_per_item(tiny):
  cfg, variables = tiny
  model = Decoder(cfg)
  rng = np.random.default_rng(0)
  # Few distinct total lengths (each is one reference compile), split differently into context + continuation;
  # the 201-token ones exceed max_seq_len = 128 and lose their oldest context tokens.
  splits = [(1, 8), (5, 4), (7, 2), (5, 2), (39, 1), (30, 10), (24, 16), (200, 1), (190, 11)]
  requests = [(rng.integers(3, 512, size=n).tolist(), rng.integers(3, 512, size=m).tolist()) for n, m in splits]
  # A continuation the model predicts greedily: its own argmax token after a context.
  ctx = requests[2][0]
  logits, _ = _jit_apply(model)(variables, jnp.asarray([ctx]), all_exits=True)
  requests.append((ctx, [int(np.argmax(logits[-1, 0, -1]))]))
  ll, greedy = fewshot.loglikelihoods(model, variables, requests, batch_size=4)
  ref_ll, ref_greedy = _reference(model, variables, requests, cfg.max_seq_len)
  np.testing.assert_allclose(ll, ref_ll, atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(greedy, ref_greedy)
  assert greedy[0, -1] and not greedy[0, :-1].all()
  # Request order does not change the scores (rows land in other batches and padded positions).
  perm = rng.permutation(len(requests))
  ll_perm, _ = fewshot.loglikelihoods(model, variables, [requests[i] for i in perm], batch_size=4)
  np.testing.assert_allclose(ll_perm, ll[:, perm], atol=1e-4, rtol=1e-5)
  # Power-of-two buckets: other lengths inside the buckets seen above (S 64 / C 8, S 16 / C 2) compile nothing.
  # (The other tiny-model tests reuse these shapes too.)
  compiled = fewshot._scorer(model)._cache_size()
  more = [(rng.integers(3, 512, size=n).tolist(), rng.integers(3, 512, size=m).tolist())
          for n, m in [(40, 8), (50, 3), (35, 6), (60, 5), (3, 2), (10, 1), (16, 1), (12, 2)]]
  fewshot.loglikelihoods(model, variables, more, batch_size=4)
  assert fewshot._scorer(model)._cache_size() == compiled


def test_lengths_pad_to_power_of_two_buckets_within_max_length(monkeypatch):
  """Inputs pad to power-of-two buckets of at least MIN_BUCKET, never past max_length; continuations to powers of
  two (rrt_jax.utils.buckets.bucket). Shapes seen by the scorer, without compiling it."""
  assert [bucket(n) for n in (0, 1, 16, 17, 100, 300)] == [16, 16, 16, 32, 128, 512]
  assert [bucket(n, minimum=1) for n in (0, 1, 2, 3, 5)] == [1, 1, 2, 4, 8]
  shapes = []

  def score(variables, tokens_BxS, pos_BxC, targets_BxC, mask_BxC):
    del variables, targets_BxC, mask_BxC
    shapes.append((tokens_BxS.shape, pos_BxC.shape))
    return np.zeros((1, len(tokens_BxS))), np.zeros((1, len(tokens_BxS)), bool)

  monkeypatch.setattr(fewshot, '_scorer', lambda model: score)
  model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=100))
  requests = [([5] * 90, [6] * 3), ([5] * 20, [6]), ([5] * 2, [6] * 5)]  # 92, 20 and 6 inputs, longest first.
  fewshot.loglikelihoods(model, {}, requests, batch_size=1)
  assert shapes == [((1, 100), (1, 4)), ((1, 32), (1, 1)), ((1, fewshot.MIN_BUCKET), (1, 8))]


def test_acc_and_acc_norm_differ_on_a_constructed_example(tiny):
  # Near-uniform predictions (a random tiny model, one byte per token): the long choice has the lower total
  # log-likelihood but the higher per-character one. Gold is the long choice: acc 0, acc_norm 1.
  cfg, variables = tiny
  items = [MultipleChoice('c/0', 'c0', 'Pick the right one of these:', ('q', 'qqqqqqq'), 1)]
  task = fewshot.Task('constructed', fewshot.MULTIPLE_CHOICE, items, [])
  result = fewshot.evaluate_tasks(Decoder(cfg), variables, ByteTokenizer(), [task], batch_size=4,
                                  progress=False)['constructed']
  assert result.n == 1 and result.per_loop == [{'acc': 0.0, 'acc_norm': 1.0}]
  # The metric itself, on given log-likelihoods (lm-eval divides by the choice's characters).
  two = [items[0], MultipleChoice('c/1', 'c1', 'x', ('ab', 'abcdefgh'), 0)]
  metrics = fewshot.multiple_choice_metrics(two, np.array([[-3.0, -5.0, -4.0, -40.0]]))
  assert metrics == [{'acc': 0.5, 'acc_norm': 1.0}]


def _toy_tasks():
  # Short texts, so that (byte tokens) their batches fall in shapes the batching test already compiled.
  mc = fewshot.Task('toy_mc', fewshot.MULTIPLE_CHOICE,
                    [MultipleChoice(f'm/{i}', f'm{i}', f'I{i}: hue', ('red', 'green', 'blue'), i % 3)
                     for i in range(6)],
                    [MultipleChoice(f'p/{i}', f'p{i}', f'P{i}: hue', ('red', 'blue'), 1) for i in range(4)])
  cloze = fewshot.Task('toy_cloze', fewshot.CLOZE, [Cloze(f'c/{i}', f'c{i}', f'ab{i} c', 'g') for i in range(5)],
                       [Cloze(f'q/{i}', f'q{i}', f'x{i}', 'z') for i in range(3)])
  return [mc, cloze]


def test_recursive_model_gives_one_score_per_loop(tiny):
  cfg, vanilla = tiny
  tasks, tok = _toy_tasks(), ByteTokenizer()
  kwargs = dict(num_shots={'toy_mc': 2, 'toy_cloze': 1}, batch_size=4, progress=False)
  base = fewshot.evaluate_tasks(Decoder(cfg), vanilla, tok, tasks, **kwargs)
  assert [len(r.per_loop) for r in base.values()] == [1, 1]
  # Full-rank relaxed 3-loop model: 3 exits, the last one is the original model.
  rec = RecursionConfig(loops=3, lora_rank=10_000)
  relaxed = to_recursive(vanilla, cfg, rec)
  out = fewshot.evaluate_tasks(Decoder(cfg, rec), relaxed, tok, tasks, **kwargs)
  for name, result in out.items():
    assert len(result.per_loop) == 3 and result.num_shots == kwargs['num_shots'][name]
    assert set(result.per_loop[0]) == ({'acc', 'acc_norm'} if name == 'toy_mc' else {'exact_match', 'ppl'})
    for key, value in base[name].per_loop[0].items():
      assert result.per_loop[-1][key] == pytest.approx(value, rel=1e-4), (name, key)
  # Each exit's log-likelihoods are that loop's: compare with all_exits logits of the recursive model.
  model = Decoder(cfg, rec)
  requests = fewshot.task_requests(tasks[1], tasks[1].items, tok, 1)
  ll, greedy = fewshot.loglikelihoods(model, relaxed, requests, batch_size=4)
  ref_ll, ref_greedy = _reference(model, relaxed, requests, cfg.max_seq_len)
  np.testing.assert_allclose(ll, ref_ll, atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(greedy, ref_greedy)
  assert np.abs(ll[0] - ll[-1]).max() > 1e-2  # Early exits are different models.
  ppl = [m['ppl'] for m in out['toy_cloze'].per_loop]
  np.testing.assert_allclose(ppl, np.exp(-ll.mean(1)), rtol=1e-6)


# ------------------------------------------------------------------------ SmolLM2-135M against transformers

@pytest.fixture(scope='module')
def smollm2(smollm2_tokenizer):
  """transformers' model from the packaged GGUF, and ours assembled from the same tensors (test_gguf.py checks
  that load_gguf gives exactly these weights; this skips a second 15 s dequantisation)."""
  import torch
  import transformers as tf

  from rrt_jax.convert.gguf import smollm2_path
  from rrt_jax.convert.hf import assemble, config_from_hf
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # Small forwards: on a busy 2-core machine more threads only contend (up to 6x slower).
  path = smollm2_path()
  hf = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype='float32').eval()
  cfg = config_from_hf(hf.config.to_dict())
  tensors = ((k, v.numpy()) for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == 'lm_head.weight'))
  params = assemble(cfg, tensors, 'SmolLM2 (transformers)')
  yield hf, Decoder(cfg), {'params': params}, smollm2_tokenizer
  torch.set_num_threads(threads)


def test_loglikelihoods_match_transformers_on_smollm2(smollm2, bb_tasks):
  import torch
  hf, model, variables, tok = smollm2
  austen = fewshot.load_task('austen_lastword')
  items = [(bb_tasks['bb_wikihow_step'], 1), (bb_tasks['bb_social_iqa'], 0), (bb_tasks['bb_winogrande_objects'], 1),
           (austen, 0)]
  requests, choices = [], 0
  for task, shots in items:
    item = min(fewshot.subset(task.items, 5, seed=5), key=lambda it: len(it.context))  # Short: a fast test.
    requests += fewshot.task_requests(task, [item], tok, shots)
    choices += len(item.choices) if task.kind == fewshot.MULTIPLE_CHOICE else 1
  assert len(requests) == choices  # Every choice of every item is scored.
  ll, greedy = fewshot.loglikelihoods(model, variables, requests, batch_size=len(requests))  # One compile.
  expected_ll, expected_greedy = [], []
  with torch.inference_mode():
    for ctx, cont in requests:
      logits = hf(torch.as_tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].double()
      logp = torch.log_softmax(logits, -1)
      expected_ll.append(float(logp[torch.arange(len(cont)), torch.as_tensor(cont)].sum()))
      expected_greedy.append(bool((logits.argmax(-1) == torch.as_tensor(cont)).all()))
  err = np.abs(ll[0] - np.array(expected_ll)).max()
  assert err <= 1e-3, err
  np.testing.assert_array_equal(greedy[0], expected_greedy)
