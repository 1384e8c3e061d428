"""The tokenizer follows the model: data.tokenizer='auto' is an HF checkpoint's own tokenizer.json (with its eos id),
a tokenizer with more ids than the model's vocabulary is refused with both sizes, and model_config.json records the
tokenizer (copied into the checkpoint) while old files without it still load. model_config.json's other faults
(garbled, missing or unknown entries) are one ValueError naming the file."""

import json
import os
import shutil

import numpy as np
import pytest
from hf_fixtures import save_tiny

from rrt_jax import presets
from rrt_jax.checkpoint import CONFIG_FILE, configs_to_json, read_configs, read_tokenizer, write_configs
from rrt_jax.config import VANILLA, RecursionConfig
from rrt_jax.data.pipeline import Tokenize
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.pretrained.hf import load_hf
from rrt_jax.pretrained.tokenizer import (
  TOKENIZER_FILE,
  BPETokenizer,
  check_vocab,
  hf_tokenizer,
  make_tokenizer,
  tokenizer_for_model,
)

SENTENCES = ['the cat sat on the mat', 'a dog ran to the park', 'the sun is warm today', 'birds sing in trees']


def tiny_tokenizer_json(path: str, truncation: int | None = None) -> None:
  """A word-level tokenizer.json with Llama's special ids (<unk> 0, <s> 1, </s> 2), built locally."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = sorted({w for s in SENTENCES for w in s.split()})
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{w: i + 3 for i, w in enumerate(words)}}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(['<unk>', '<s>', '</s>'])
  if truncation:
    tokenizer.enable_truncation(truncation)
  tokenizer.save(path)


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  """A tiny HF Llama (vocab 96, config.json eos_token_id 2) with its own small tokenizer.json."""
  directory = str(tmp_path_factory.mktemp('llama'))
  save_tiny('llama', directory)
  tiny_tokenizer_json(os.path.join(directory, TOKENIZER_FILE))
  return directory


def test_auto_is_the_hf_checkpoints_own_tokenizer(llama_dir):
  from tokenizers import Tokenizer
  tokenizer, spec = tokenizer_for_model('auto', 'hf', llama_dir)
  assert spec == 'hf:' + os.path.abspath(llama_dir)
  assert tokenizer.eos_id == 2 and tokenizer.decode([2], skip_special_tokens=False) == '</s>'
  expected = Tokenizer.from_file(os.path.join(llama_dir, TOKENIZER_FILE)).encode(SENTENCES[0]).ids
  assert tokenizer.encode(SENTENCES[0]).ids == expected and 0 not in expected
  cfg, _ = load_hf(llama_dir)
  check_vocab(tokenizer, cfg.vocab_size, 'the tiny llama')  # 21 ids into a vocabulary of 96: fine.
  assert make_tokenizer(spec).encode(SENTENCES[1]).ids == tokenizer.encode(SENTENCES[1]).ids


def test_smollm2_tokenizer_on_a_small_vocab_model_is_refused_with_both_sizes(llama_dir):
  cfg, _ = load_hf(llama_dir)
  with pytest.raises(ValueError, match=r'smollm2 has 49152 tokens .* vocabulary has 96.*data.tokenizer=auto'):
    check_vocab(make_tokenizer('smollm2'), cfg.vocab_size, f'model.source=hf {llama_dir}')


def test_out_of_range_ids_are_refused_on_the_host():
  with pytest.raises(ValueError, match=r'tokenizer bytes produced id 114, outside .* vocabulary of 100'):
    Tokenize(ByteTokenizer(), vocab_size=100).map({'text': b'hello'})
  assert Tokenize(ByteTokenizer(), vocab_size=259).map({'text': b'hello'})['tokens'][-1] == 2


def test_a_checkpoint_without_tokenizer_json_names_the_file_and_the_alternatives(tmp_path):
  save_tiny('llama', str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'tokenizer\.json is missing.*hf:/dir/with/tokenizer\.json, smollm2 '
                                              'or bytes'):
    tokenizer_for_model('auto', 'hf', str(tmp_path))


def test_auto_for_other_sources():
  assert tokenizer_for_model('auto', 'smollm2', '')[1] == 'smollm2'
  with pytest.raises(ValueError, match='model.source=random has none: name one with --config.data.tokenizer=bytes'):
    tokenizer_for_model('auto', 'random', '')
  tokenizer, spec = tokenizer_for_model('bytes', 'random', '')
  assert isinstance(tokenizer, ByteTokenizer) and spec == 'bytes'
  with pytest.raises(ValueError, match='model.source=hf needs --config.model.path'):
    tokenizer_for_model('auto', 'hf', '')
  with pytest.raises(ValueError, match='resolve it with tokenizer_for_model'):
    make_tokenizer('auto')


def test_eos_from_generation_config_list_or_tokenizer_config(tmp_path):
  tiny_tokenizer_json(str(tmp_path / TOKENIZER_FILE))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': {'content': '<s>'}}))
  assert hf_tokenizer(tmp_path).eos_id == 1  # No eos_token_id anywhere: tokenizer_config.json's eos_token.
  (tmp_path / 'config.json').write_text(json.dumps({'eos_token_id': 0}))
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [2, 1]}))
  assert hf_tokenizer(tmp_path).eos_id == 2  # generation_config.json first; a list's first id.
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': 500}))
  with pytest.raises(ValueError, match='eos_token_id 500 is outside'):
    hf_tokenizer(tmp_path)
  for name in ('generation_config.json', 'config.json', 'tokenizer_config.json'):
    (tmp_path / name).unlink()
  with pytest.raises(ValueError, match='names no end-of-sequence token'):
    hf_tokenizer(tmp_path)


def test_a_truncating_tokenizer_json_does_not_cut_documents(tmp_path):
  tiny_tokenizer_json(str(tmp_path / TOKENIZER_FILE), truncation=3)
  (tmp_path / 'config.json').write_text(json.dumps({'eos_token_id': 2}))
  text = ' '.join(SENTENCES)
  assert len(make_tokenizer(f'hf:{tmp_path}').encode(text).ids) == len(text.split())


def test_model_config_json_records_the_tokenizer_and_carries_an_hf_one(llama_dir, tmp_path):
  cfg, _ = load_hf(llama_dir)
  rec = RecursionConfig(loops=2)
  source = tmp_path / 'source'
  shutil.copytree(llama_dir, source)
  tokenizer, spec = tokenizer_for_model('auto', 'hf', str(source))
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  write_configs(ckpt, cfg, rec, tokenizer)
  entry = json.loads((ckpt / CONFIG_FILE).read_text())['tokenizer']
  assert entry == {'spec': 'file:tokenizer.json', 'eos_id': 2, 'vocab_size': tokenizer.get_vocab_size(), 'from': spec}
  shutil.rmtree(source)  # The checkpoint is self-contained: its copy of tokenizer.json is what loads.
  back = read_tokenizer(ckpt)
  assert isinstance(back, BPETokenizer) and back.eos_id == 2
  assert back.encode(SENTENCES[2]).ids == tokenizer.encode(SENTENCES[2]).ids
  assert read_configs(ckpt, 'missing') == (cfg, rec)

  write_configs(ckpt, cfg, rec, 'bytes')  # Packaged tokenizers are recorded by name (a spec string works too).
  assert json.loads((ckpt / CONFIG_FILE).read_text())['tokenizer'] == {'spec': 'bytes', 'eos_id': 2, 'vocab_size': 259}
  assert isinstance(read_tokenizer(ckpt), ByteTokenizer)

  (ckpt / CONFIG_FILE).write_text(json.dumps(configs_to_json(cfg, rec, {'spec': 'bytes', 'eos_id': 7})))
  with pytest.raises(ValueError, match='had eos_id=7, but it loads with eos_id=2'):
    read_tokenizer(ckpt)


def test_old_model_config_json_without_a_tokenizer_still_loads(tmp_path):
  cfg = presets.TINY_LLAMA
  (tmp_path / CONFIG_FILE).write_text(json.dumps(configs_to_json(cfg, VANILLA)))
  data = json.loads((tmp_path / CONFIG_FILE).read_text())
  del data['model']['rope_scaling']  # Older files predate this field too.
  (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
  assert read_configs(tmp_path, 'missing') == (cfg, VANILLA)
  assert read_tokenizer(tmp_path) is None
  with pytest.raises(ValueError, match='records no tokenizer .*older rrt_jax'):
    read_tokenizer(tmp_path, required=True)


@pytest.mark.parametrize('edit, message', [
    (lambda d: '{"model": {', 'is not valid JSON'),
    (lambda d: {'recursion': d['recursion']}, "the 'model' section is missing"),
    (lambda d: {**d, 'model': [1]}, "the 'model' section is not a JSON object"),
    (lambda d: {**d, 'model': {**d['model'], 'foo': 1}}, 'unknown field.* foo in model: written by a newer rrt_jax'),
    (lambda d: {**d, 'extra': {}}, 'unknown section.* extra: written by a newer rrt_jax'),
    (lambda d: {**d, 'model': {k: v for k, v in d['model'].items() if k != 'vocab_size'}},
     'vocab_size missing in model'),
    (lambda d: {**d, 'recursion': {**d['recursion'], 'looping': 'spiral'}}, "bad recursion section: Unknown looping"),
    (lambda d: {**d, 'model': {**d['model'], 'rope_scaling': {'rope_type': 'longrope', 'factor': 2.0}}},
     "bad model section: RoPE scaling type 'longrope' is not supported"),
    (lambda d: [d], 'expected a JSON object'),
])
def test_a_bad_model_config_json_is_one_clear_error(tmp_path, edit, message):
  cfg = presets.TINY_LLAMA
  data = edit(configs_to_json(cfg, VANILLA))
  (tmp_path / CONFIG_FILE).write_text(data if isinstance(data, str) else json.dumps(data))
  with pytest.raises(ValueError, match=message) as info:
    read_configs(tmp_path, 'missing')
  assert str(tmp_path / CONFIG_FILE) in str(info.value)


def test_hf_tokenizer_pickles_for_grain_workers(llama_dir):
  import pickle
  tokenizer = make_tokenizer(f'hf:{llama_dir}')
  copy = pickle.loads(pickle.dumps(tokenizer))
  assert (copy.eos_id, copy.spec) == (tokenizer.eos_id, tokenizer.spec)
  assert np.array_equal(copy.encode(SENTENCES[3]).ids, tokenizer.encode(SENTENCES[3]).ids)


# Training wiring (rrt_jax/train/loop.py: tokenizer_for_model, check_vocab, write_configs(..., tokenizer)).

def hf_run(llama_dir: str, tokenizer: str):
  from experiments.configs import tiny_cpu
  c = tiny_cpu.get_config()
  c.model.source, c.model.path, c.data.tokenizer = 'hf', llama_dir, tokenizer
  c.train.steps = c.checkpoint.every_steps = 2
  c.data.seq_len, c.data.global_batch, c.log_every, c.checkpoint.async_save = 16, 2, 1, False
  return c


def test_training_an_hf_model_uses_and_records_its_own_tokenizer(llama_dir, tmp_path):
  from rrt_jax.train.loop import train
  history = train(hf_run(llama_dir, 'auto'), str(tmp_path), source=[{'text': s} for s in SENTENCES * 8])
  assert all(np.isfinite(h['loss']) for h in history)
  assert (tmp_path / TOKENIZER_FILE).exists()
  assert read_tokenizer(tmp_path).encode(SENTENCES[0]).ids == make_tokenizer(f'hf:{llama_dir}').encode(
      SENTENCES[0]).ids


def test_training_an_hf_model_with_a_bigger_tokenizer_is_refused_before_the_first_step(llama_dir, tmp_path):
  from rrt_jax.train.loop import train
  with pytest.raises(ValueError, match=r'49152 tokens .* vocabulary has 96'):
    train(hf_run(llama_dir, 'smollm2'), str(tmp_path), source=[{'text': s} for s in SENTENCES * 8])
