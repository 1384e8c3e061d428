"""Few-shot log-likelihood scoring: real word-analogy / Austen-LastWord items, BIG-bench parsing on a local
sdist-shaped archive, clear errors when a source package is gone, parity with transformers on SmolLM2,
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

from rrt_jax import Decoder, RecursionConfig, package_sources, presets
from rrt_jax.convert import to_recursive
from rrt_jax.data import analogies, bigbench, packages, prepare
from rrt_jax.data.multiple_choice import MultipleChoice
from rrt_jax.eval import austen_lastword, fewshot
from rrt_jax.eval.austen_lastword import Cloze
from rrt_jax.model import init_variables
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.utils.buckets import bucket

# Facts of the pinned gensim==4.4.0 wheel's analogy file: (items, groups) per task after the bucket rule.
EXPECTED = {'analogy_semantic': (1236, 30), 'analogy_syntactic': (1291, 66)}


# ----------------------------------------------------------------------------------------------- real data

@pytest.fixture(scope='module')
def analogy_tasks():
  return {name: fewshot.load_task(name) for name in analogies.TASKS}


@pytest.mark.parametrize('name', analogies.TASKS)
def test_analogy_items_parse(analogy_tasks, name):
  task = analogy_tasks[name]
  items = task.items + task.pool
  count, groups = EXPECTED[name]
  assert len(items) == count and len({it.group for it in items}) == groups and task.kind == fewshot.MULTIPLE_CHOICE
  assert {len(it.choices) for it in items} == {analogies.NUM_CHOICES}
  assert all(len(set(it.choices)) == analogies.NUM_CHOICES for it in items)
  assert len({it.id for it in items}) == len(items)
  # Gold positions are spread (a model that always picks one slot scores ~1/4).
  golds = np.bincount([it.gold for it in items], minlength=analogies.NUM_CHOICES) / len(items)
  assert golds.min() > 0.2
  assert 0.03 < len(task.pool) / len(items) < 0.2
  assert not {it.group for it in task.pool} & {it.group for it in task.items}


def test_analogy_item_contents_and_no_leak_through_shots(analogy_tasks):
  by_id = {it.id: it for t in analogy_tasks.values() for it in t.items + t.pool}
  item = by_id['analogy_semantic/capital-common-countries/22']
  assert item.context == 'Baghdad is to Iraq as Bangkok is to' and item.choices[item.gold] == 'Thailand'
  assert item.solved() == 'Baghdad is to Iraq as Bangkok is to Thailand'
  item = by_id['analogy_syntactic/gram9-plural-verbs/867']
  assert item.context == 'write is to writes as vanish is to' and item.choices[item.gold] == 'vanishes'
  # Distractors are answers of the same section, never the item's own b word.
  sections = analogies.read_sections(analogies.wheel_member(analogies.SOURCE, analogies.MEMBER))
  assert sum(map(len, sections.values())) == 19544 and len(sections) == 14
  for task in analogy_tasks.values():
    for it in task.items[:300]:
      _, section, row = it.id.split('/')
      a, b, c, d = sections[section][int(row)]
      answers = {r[3] for r in sections[section]}
      assert it.context == f'{a} is to {b} as {c} is to' and it.choices[it.gold] == d
      assert set(it.choices) <= answers and b not in it.choices
    # No few-shot example holds a word pair of any scored item (the buckets partition the pairs).
    def pairs(it):
      _, section, row = it.id.split('/')
      a, b, c, d = sections[section][int(row)]
      return {(section, a, b), (section, c, d)}
    pool_pairs = set().union(*map(pairs, task.pool))
    assert not [it.id for it in task.items if pairs(it) & pool_pairs]


def test_the_pinned_wheel_is_checked_by_sha256(analogy_tasks):
  del analogy_tasks
  path = packages.pinned_wheel(analogies.SOURCE)
  assert os.path.basename(path) == analogies.SOURCE.filename
  assert packages.sha256_of(path) == analogies.SOURCE.sha256


def test_a_vanished_or_changed_package_is_one_clear_error(tmp_path, monkeypatch):
  wheel = package_sources.PinnedWheel('gensim', '4.4.0', analogies.SOURCE.filename, '0' * 64)
  # The registry serves a file of that name with other bytes: refused, and not left in the cache.
  def fake_download(cmd, dest, pattern, key):
    del cmd, pattern, key
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, wheel.filename)
    with open(path, 'wb') as f:
      f.write(b'not the pinned wheel')
    return [path]
  monkeypatch.setattr(packages, 'download', fake_download)
  with pytest.raises(packages.PackageUnavailable, match='registry serves a different file'):
    packages.pinned_wheel(wheel, str(tmp_path))
  assert not os.listdir(os.path.join(tmp_path, 'pypi', 'gensim-4.4.0'))
  # The registry no longer serves it: one line naming the package, the file and where a copy goes.
  def failing_download(cmd, dest, pattern, key):
    raise RuntimeError('`pip download ...` failed: ERROR: No matching distribution found for gensim==4.4.0')
  monkeypatch.setattr(packages, 'download', failing_download)
  with pytest.raises(packages.PackageUnavailable) as err:
    packages.pinned_wheel(wheel, str(tmp_path))
  message = str(err.value)
  assert '\n' not in message and 'gensim==4.4.0' in message and 'No matching distribution' in message
  assert os.path.join(str(tmp_path), 'pypi', 'gensim-4.4.0', wheel.filename) in message
  # The same for the BIG-bench sdist, which the registry no longer serves.
  monkeypatch.setattr(bigbench, 'download', failing_download)
  with pytest.raises(packages.PackageUnavailable, match=r'bigbench==1\.0\.0 is no longer served.*place '):
    fewshot.load_task('bb_social_iqa', str(tmp_path))


def test_pip_download_args_select_the_exact_file():
  args = analogies.SOURCE.pip_download_args()
  assert args[-1] == 'gensim==4.4.0' and '--only-binary=:all:' in args
  assert [args[i + 1] for i, a in enumerate(args) if a == '--platform'] == ['manylinux_2_24_x86_64',
                                                                           'manylinux_2_28_x86_64']
  assert args[args.index('--python-version') + 1] == '311' and args[args.index('--abi') + 1] == 'cp311'


# BIG-bench's task.json layout, a few examples per task (the first of each as in bigbench 1.0.0): the parser and the
# streaming extraction run on a local sdist-shaped archive, as the registry no longer serves the real one.
_BB_EXAMPLES = {
    'goal_step_wikihow/step_inference/task.json': [
        {'input': "The most reasonable step of 'Solve an Algebraic Expression' is",
         'target_scores': {'Find the domain': 0, 'Know the order of operations': 1, 'Buy a calculator': 0,
                           'Draw a graph': 0}},
        {'input': "The most reasonable step of 'Bake Bread' is",
         'target_scores': {'Knead the dough': 1, 'Wash the car': 0, 'Paint a wall': 0, 'Call a friend': 0}}],
    'social_iqa/task.json': [
        {'input': 'Tracy had a long day at work. What does Tracy need to do before this?',
         'target_scores': {'Find somewhere to go': 1, 'Stay home': 0, 'Sleep all day': 0}},
        {'input': 'Sam lent a pen. Why did Sam do this?', 'target_scores': {'To help': 1, 'To hurt': 0}}],
    'natural_instructions/subtask029_winogrande_full_object/task.json': [
        {'input': 'holes, spaces', 'target': [
            'Sentence 1: The rats fled their holes for the open spaces since the _ were crowded for them.\n'
            'Answer1: holes.\nSentence 2: The rats fled their holes for the open spaces since the _ were roomy '
            'for them.\nAnswer2: spaces.', 'an alternative pair']},
        {'input': 'cup, jar', 'target': ['Sentence 1: No blank here.\nAnswer1: cup\nSentence 2: None.\nAnswer2: jar']}],
    'natural_instructions/subtask030_winogrande_full_person/task.json': [
        {'input': 'x', 'target': ['Sentence 1: PersonX thanked PersonY because _ was helped.\n'
                                  'Sentence 2: PersonX thanked PersonY because _ was helpful.']}],
}


@pytest.fixture(scope='module')
def bb_cache(tmp_path_factory):
  """A data cache holding an sdist-shaped archive of BIG-bench task files (plus a file that must not be extracted)."""
  import io
  import tarfile
  root = str(tmp_path_factory.mktemp('bb_cache'))
  sdist = os.path.join(root, 'pypi', bigbench.SPEC.replace('==', '-'), bigbench.SDIST)
  os.makedirs(os.path.dirname(sdist))
  with tarfile.open(sdist, 'w:gz') as tar:
    files = {**{bigbench.TASKS_ROOT + rel: json.dumps({'examples': ex}) for rel, ex in _BB_EXAMPLES.items()},
             bigbench.TASKS_ROOT + 'other_task/task.json': '{}'}
    for name, text in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(text.encode())
      tar.addfile(info, io.BytesIO(text.encode()))
  return root


def test_bigbench_items_parse_from_an_sdist_in_the_cache(bb_cache):
  tasks = {name: fewshot.load_task(name, bb_cache) for name in bigbench.TASKS}
  by_id = {it.id: it for t in tasks.values() for it in t.items + t.pool}
  wiki = by_id['bb_wikihow_step/0']
  assert wiki.context == "The most reasonable step of 'Solve an Algebraic Expression' is"
  assert wiki.choices[wiki.gold] == 'Know the order of operations' and len(wiki.choices) == 4
  siqa = by_id['bb_social_iqa/0']
  assert siqa.context.startswith('Q: Tracy') and siqa.context.endswith('before this?\nA:')
  assert siqa.choices[siqa.gold] == 'Find somewhere to go' and len(by_id['bb_social_iqa/1'].choices) == 2
  # A twin pair: same options, opposite answers, the option fills the blank and the rest is scored.
  a, b = (by_id[f'bb_winogrande_objects/0/{k}'] for k in (1, 2))
  assert a.choices == b.choices == ('holes', 'spaces') and (a.gold, b.gold) == (0, 1) and a.group == b.group
  assert a.solved() == 'The rats fled their holes for the open spaces since the holes were crowded for them.'
  assert a.requests()[1] == ('The rats fled their holes for the open spaces since the spaces',
                             ' were crowded for them.')
  assert 'bb_winogrande_objects/1/1' not in by_id  # No blank: skipped.
  persons = [by_id[f'bb_winogrande_persons/0/{k}'] for k in (1, 2)]
  assert all(re.fullmatch(r'(?i)person ?[xy]', c) for it in persons for c in it.choices)
  assert [it.gold for it in persons] == [0, 1]
  # Only the needed task files were extracted, in one pass.
  base = os.path.join(os.path.dirname(bigbench.sdist_path(bb_cache)), 'tasks')
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
  from rrt_jax.pretrained.gguf import load_tokenizer
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
  with pytest.raises(ValueError, match=r"choose from \['analogy_semantic', 'analogy_syntactic', 'austen_lastword'"):
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

  from rrt_jax.pretrained.gguf import smollm2_path
  from rrt_jax.pretrained.hf import assemble, config_from_hf
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


def _all_scored(task: fewshot.Task) -> fewshot.Task:
  return fewshot.Task(task.name, task.kind, task.items + task.pool, [])


def test_loglikelihoods_match_transformers_on_smollm2(smollm2, analogy_tasks, bb_cache):
  import torch
  hf, model, variables, tok = smollm2
  austen = fewshot.load_task('austen_lastword')
  items = [(analogy_tasks['analogy_semantic'], 1), (analogy_tasks['analogy_syntactic'], 0),
           (_all_scored(fewshot.load_task('bb_winogrande_objects', bb_cache)), 0), (austen, 0)]
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
