"""The tokenizer choice owns the end-of-sequence id: SmolLM2's comes from its vocabulary, the byte tokenizer's is 2,
and it survives the pickling that grain's worker processes do."""

import pickle

import pytest

from rrt_jax.pretrained.tokenizer import SMOLLM2_EOS, make_tokenizer


def test_smollm2_eos_is_im_end_id_2():
  tokenizer = make_tokenizer('smollm2')
  assert tokenizer.eos_id == tokenizer.token_to_id(SMOLLM2_EOS) == 2
  assert tokenizer.encode(SMOLLM2_EOS).ids == [2]  # A special token: one id, never split.
  assert tokenizer.decode([2], skip_special_tokens=False) == SMOLLM2_EOS


def test_byte_tokenizer_eos():
  tokenizer = make_tokenizer('bytes')
  assert tokenizer.eos_id == 2 and 2 not in tokenizer.encode('any text').ids


@pytest.mark.parametrize('name', ['smollm2', 'bytes'])
def test_eos_survives_pickling(name):
  tokenizer = make_tokenizer(name)
  copy = pickle.loads(pickle.dumps(tokenizer))
  assert copy.eos_id == tokenizer.eos_id
  assert copy.encode('Hello, world').ids == tokenizer.encode('Hello, world').ids


def test_unknown_tokenizer_names_the_choices():
  with pytest.raises(ValueError, match='Unknown data.tokenizer .*choose smollm2 or bytes'):
    make_tokenizer('gpt2')
