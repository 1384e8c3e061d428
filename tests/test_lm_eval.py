"""The lm-eval-harness model `rrt_jax` (rrt_jax.eval.lm_eval) against our own scorer and generator, on hand-made
requests (no lm-eval task downloads), and the experiments.evaluate CLI on a tiny trained workdir."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tiny_config import tiny_config

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.eval import fewshot
from rrt_jax.eval.perplexity import per_loop_perplexity, sliding_windows
from rrt_jax.model import init_variables
from rrt_jax.model.exits import ExitConfig
from rrt_jax.serve.generate import generate, generator_for

lm_eval = pytest.importorskip('lm_eval')
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from rrt_jax.eval import lm_eval as adapter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4  # One batch size everywhere: the scorer's and the generator's compiled shapes are shared.


class CharTokenizer:
  """One character per id (chr(id)): every id sequence decodes to text that encodes back to it, so greedy
  generations can be scored as continuations."""

  eos_id = 2

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str):
    class Encoding:
      ids = [ord(c) for c in text]
    return Encoding()

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return ''.join(map(chr, ids))

  def get_vocab_size(self) -> int:
    return self.vocab_size


def _text(tok, ids) -> str:
  return tok.decode(list(ids))


def _request(kind: str, *args) -> Instance:
  return Instance(kind, {}, tuple(args), 0)


@pytest.fixture(scope='module')
def tiny():
  """A relaxed 2-loop tiny Llama (random weights, 2 exits) with the character tokenizer."""
  cfg = presets.TINY_LLAMA.replace(max_seq_len=64)
  rec = RecursionConfig(loops=2, lora_rank=8)
  variables = to_recursive(init_variables(cfg, RecursionConfig(), jax.random.key(0)), cfg, rec)
  return Decoder(cfg, rec), variables, CharTokenizer(cfg.vocab_size)


def _start_evaluate(workdir: str, out_dir, *flags) -> tuple[subprocess.Popen, str]:
  """experiments.evaluate in a subprocess (stdout and stderr to files), offline: Hugging Face hubs switched off."""
  os.makedirs(out_dir, exist_ok=True)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1',
         'HF_HOME': os.path.join(out_dir, 'hf')}
  argv = [sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}', '--limit=2', f'--batch_size={BATCH}',
          f'--out={os.path.join(out_dir, "results.json")}', *flags]
  with open(os.path.join(out_dir, 'stdout'), 'w') as stdout, open(os.path.join(out_dir, 'stderr'), 'w') as stderr:
    return subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=stderr, env=env), out_dir


def _finish_evaluate(started, timeout: float = 600) -> tuple[list[str], dict]:
  proc, out_dir = started
  proc.wait(timeout)
  read = lambda name: open(os.path.join(out_dir, name)).read()  # noqa: E731
  assert proc.returncode == 0, read('stderr')[-3000:]
  lines = read('stdout').splitlines()
  header = next(line for line in lines if line.startswith('task'))
  assert header.split()[-4:] == ['exit', '1', 'exit', '2']
  rows = {r['task']: r for r in json.loads(read('results.json'))['results']}
  for row in rows.values():
    assert set(row['per_exit']) == {'1', '2'}
  return lines, rows


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny model trained for 2 steps (byte tokenizer, recorded in its model_config.json), and the CLI already
  evaluating it in a subprocess (it runs beside the other tests; test_the_cli_... waits for it)."""
  from rrt_jax.train.loop import train
  base = tmp_path_factory.mktemp('lm_eval')
  path = str(base / 'run')
  train(tiny_config(**{'train.steps': 2, 'checkpoint.every_steps': 0}), path)
  cli = _start_evaluate(path, str(base / 'cli'), '--tasks=analogy_semantic,austen_lastword')
  yield path, cli
  if cli[0].poll() is None:
    cli[0].kill()
    cli[0].wait()


@pytest.fixture(scope='module')
def workdir(trained):
  return trained[0]


def test_the_registry_resolves_rrt_jax(workdir):
  cls = get_model('rrt_jax')
  assert cls is adapter.RRTLM and issubclass(cls, lm_eval.api.model.LM)
  lm = cls.create_from_arg_string(f'pretrained={workdir},exit_loop=1', {'batch_size': BATCH, 'device': 'cpu'})
  assert (lm.exit_loop, lm.num_exits, lm.batch_size) == (1, 2, BATCH)
  assert lm.get_model_info()['step'] == 2 and lm.tokenizer_name == 'bytes'
  with pytest.raises(ValueError, match=r'exit_loop must be in 1\.\.2'):
    cls.create_from_arg_string(f'pretrained={workdir},exit_loop=3')
  with pytest.raises(ValueError, match='pretrained=.* or source='):
    cls()


def _expected_pairs(tok, requests, eos_id):
  """lm-eval's split, written out: an empty context is the end-of-text token."""
  out = []
  for ctx, cont in requests:
    if ctx == '':
      out.append(([eos_id], list(tok.encode(cont).ids)))
    else:
      out.append(fewshot.encode_pair(tok, ctx, cont))
  return out


PROMPTS = [list(range(40, 52)), list(range(100, 105)), list(range(200, 215)), list(range(300, 309))]  # <= 16 tokens.
MAX_GEN = 8


@pytest.fixture(scope='module')
def generations(tiny):
  """Our generator's greedy outputs for PROMPTS (one batch): {exit: tokens per prompt}. Exit 1 is the full model
  told to exit after every token's first loop (threshold 0); exit 2 never exits early. (generator_for: compiled
  once, shared with the adapter where the settings are the same.)"""
  model, variables, tok = tiny
  return {e: generate(model, variables, PROMPTS, MAX_GEN, exit_cfg=cfg, stop_tokens=[tok.eos_id],
                      generator=generator_for(model, cfg)).tokens
          for e, cfg in ((1, ExitConfig(0.0)), (2, ExitConfig()))}


@pytest.mark.parametrize('which', ['random', 'trained'])
def test_loglikelihood_equals_our_scorer_at_every_exit(tiny, generations, workdir, which, monkeypatch):
  if which == 'random':
    model, variables, tok = tiny
    lm = adapter.RRTLM(model=model, variables=variables, tokenizer=tok, batch_size=BATCH, progress=False)
    # A continuation the model produces greedily at exit 1.
    extra = [(_text(tok, PROMPTS[0]), _text(tok, generations[1][0][:3]))]
  else:
    lm = adapter.RRTLM(pretrained=workdir, batch_size=BATCH, progress=False)
    model, variables, tok = lm.model, lm.variables, lm.tokenizer
    extra = [('It was a dark and stormy', ' night')]
  # One batch of BATCH requests (one compiled shape): a trailing space, an empty context, a question.
  requests = [('The cat sat on the ', 'mat.'), ('', 'Hello'), ('Q: Why?\nA:', ' Because it rained')] + extra
  ll, greedy = fewshot.loglikelihoods(model, variables, _expected_pairs(tok, requests, tok.eos_id), BATCH)
  calls = []
  scorer = fewshot.loglikelihoods
  monkeypatch.setattr(fewshot, 'loglikelihoods', lambda *a, **k: calls.append(1) or scorer(*a, **k))
  last = lm.loglikelihood([_request('loglikelihood', *r) for r in requests])  # Instances...
  first = lm.at_exit(1).loglikelihood(requests)  # ...or the API's (context, continuation) tuples.
  assert len(calls) == 1  # The second exit re-scores nothing: one pass scored both.
  for e, got in ((1, first), (2, last)):
    np.testing.assert_allclose([g[0] for g in got], ll[e - 1], rtol=1e-6)
    assert [g[1] for g in got] == greedy[e - 1].tolist()
    assert all(isinstance(g[0], float) and isinstance(g[1], bool) for g in got)
  assert not np.allclose(ll[0], ll[1])  # The exits are different models.
  if which == 'random':
    assert first[-1][1]  # Greedy at exit 1.


def test_loglikelihood_rolling_equals_our_perplexity_total(tiny):
  model, variables, tok = tiny
  window = 32
  lm = adapter.RRTLM(model=model, variables=variables, tokenizer=tok, batch_size=BATCH, max_length=window,
                     progress=False)
  rng = np.random.default_rng(0)
  texts = [_text(tok, rng.integers(3, 512, size=n)) for n in (20, 2 * window)]  # One window; two full ones.
  for exit_loop in (1, 2):
    got = lm.at_exit(exit_loop).loglikelihood_rolling([_request('loglikelihood_rolling', t) for t in texts])
    for text, total in zip(texts, got, strict=True):
      windows = sliding_windows([tok.eos_id] + list(tok.encode(text).ids), window)
      ppl = per_loop_perplexity(model, variables, windows)[exit_loop - 1]
      assert total == pytest.approx(-math.log(ppl) * windows.num_tokens, rel=1e-5)
  assert lm.loglikelihood_rolling(['']) == [0.0]


def test_generate_until_is_our_greedy_generation(tiny, generations):
  model, variables, tok = tiny
  lm = adapter.RRTLM(model=model, variables=variables, tokenizer=tok, batch_size=BATCH, progress=False)
  contexts = [_text(tok, p) for p in PROMPTS]
  for exit_loop in (2, 1):  # Exit 1 generates with the model's first loop only (rrt_jax.model.first_loops).
    view, expected = lm.at_exit(exit_loop), [_text(tok, t) for t in generations[exit_loop]]
    got = view.generate_until([_request('generate_until', c, {'max_gen_toks': MAX_GEN}) for c in contexts])
    assert got == expected
    assert all(len(g) == MAX_GEN for g in got)  # max_gen_toks (this model never emits the end-of-text token).
    # Stop strings: each text ends before the first of them (here a character the first generation contains).
    stop = expected[0][3]
    got = view.generate_until([(c, {'until': [stop, 'never'], 'max_gen_toks': MAX_GEN}) for c in contexts])
    assert got == [t.split(stop)[0] for t in expected] and len(got[0]) <= 3
    got = view.generate_until([(c, {'max_gen_toks': 2}) for c in contexts[:2]])
    assert got == [t[:2] for t in expected[:2]]
  # Early exit through our generator's threshold: 0 exits every token after loop 1, as exit 1 does.
  early = adapter.RRTLM(model=model, variables=variables, tokenizer=tok, batch_size=BATCH, exit_threshold=0.0,
                        progress=False)
  assert early.generate_until([(c, {'max_gen_toks': MAX_GEN}) for c in contexts]) == [
      _text(tok, t) for t in generations[1]]


def test_rrt_jax_never_imports_lm_eval_and_says_how_to_install_it():
  code = textwrap.dedent('''
      import sys
      import rrt_jax, rrt_jax.eval.fewshot, rrt_jax.eval.perplexity, rrt_jax.serve.generate
      assert 'lm_eval' not in sys.modules
      sys.modules['lm_eval'] = None  # As if it were not installed.
      from rrt_jax.eval import lm_eval
      try:
        lm_eval.RRTLM(source='smollm2')
      except ImportError as e:
        print(e)
      ''')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr
  assert 'pip install lm-eval==' in out.stdout


TOY_TASK = '''\
task: rrt_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def test_the_cli_prints_per_exit_accuracy_of_a_trained_workdir(trained):
  lines, rows = _finish_evaluate(trained[1])
  assert any(line.split()[:3] == ["analogy_semantic", "2", "acc"] for line in lines)
  assert any(line.split()[:3] == ['austen_lastword', '2', 'exact_match'] for line in lines)
  assert set(rows) == {"analogy_semantic", "austen_lastword"}
  assert all(0 <= m['acc'] <= 1 for m in rows["analogy_semantic"]['per_exit'].values())


@pytest.mark.slow  # lm_eval.simple_evaluate end to end, on a local task (a JSON lines file: nothing downloaded).
def test_the_cli_runs_lm_eval_tasks_through_simple_evaluate(workdir, tmp_path):
  data = tmp_path / 'toy.jsonl'
  data.write_text(''.join(json.dumps({'question': q, 'choices': c, 'gold': g}) + '\n' for q, c, g in [
      ('Sky colour?', ['blue', 'green'], 0), ('Grass colour?', ['red', 'green'], 1), ('Snow?', ['white', 'ink'], 0)]))
  (tmp_path / 'tasks').mkdir()
  (tmp_path / 'tasks' / 'toy.yaml').write_text(TOY_TASK.format(data=data))
  lines, rows = _finish_evaluate(_start_evaluate(workdir, str(tmp_path / 'cli'), '--tasks=',
                                                 '--lm_eval_tasks=rrt_toy_mc',
                                                 f'--lm_eval_include_path={tmp_path / "tasks"}'))
  assert any(line.split()[:3] == ['rrt_toy_mc', '3', 'acc'] for line in lines)
  assert set(rows) == {'rrt_toy_mc'}
  assert all(0 <= m['acc'] <= 1 for m in rows['rrt_toy_mc']['per_exit'].values())


def test_importing_the_adapter_keeps_lm_evals_own_models():
  code = ('import rrt_jax.eval.lm_eval\nfrom lm_eval.api.registry import get_model\n'
          "print(get_model('hf').__name__, get_model('rrt_jax').__name__)")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['HFLM', 'RRTLM']
