r"""Generate text with early exit from a trained run, a saved model, or the packaged SmolLM2: `rrt-generate`, or
from a checkout `python -m experiments.generate`.

  rrt-generate --prompt="The capital of France is"                                  # SmolLM2-135M, vanilla
  rrt-generate --workdir=workdir/main/uptrain --exit_threshold=0.8 --prompt="Once upon"
  rrt-generate --checkpoint=/tmp/ckpt --prompt="..."                                 # rrt_jax.save output

Prints the model and the tokenizer it uses (the one the workdir or checkpoint records, unless --tokenizer names
another), then each completion and the loop at which every generated token exited.
"""

from __future__ import annotations

from absl import app, flags

from rrt_jax import checkpoint
from rrt_jax.cli import common
from rrt_jax.pretrained.tokenizer import spec_of
from rrt_jax.serve.generate import ExitConfig, SamplingConfig, generate

_PROMPTS = flags.DEFINE_multi_string('prompt', ['The capital of France is'], 'Prompt(s); repeat the flag for more.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'A training workdir (latest checkpoint).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', 'A directory written by rrt_jax.save.')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'A tokenizer spec (smollm2, bytes, hf:<dir>) instead of the one '
                                 'the workdir or checkpoint records.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate per prompt.')
_THRESHOLD = flags.DEFINE_float('exit_threshold', 1.0, 'Early-exit confidence threshold (1 = never exit).')
_CONFIDENCE = flags.DEFINE_enum('confidence', 'max_prob', ['max_prob', 'margin', 'saturation'], 'Exit measure.')
_KV_FILL = flags.DEFINE_enum('kv_fill', 'propagate', ['propagate', 'full'], 'Skipped KV: propagate or compute.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0 = greedy).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k filter (0 = off).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus filter (1 = off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def load_model():
  """The model and its tokenizer: the one recorded in the workdir or checkpoint (--tokenizer overrides it), or
  SmolLM2's for the packaged model."""
  if _WORKDIR.value and _CHECKPOINT.value:
    raise app.UsageError('Give --workdir or --checkpoint, not both.')
  tokenizer = _TOKENIZER.value or None
  if _WORKDIR.value or _CHECKPOINT.value:
    return checkpoint.load_pretrained(_WORKDIR.value or _CHECKPOINT.value, tokenizer=tokenizer)
  return checkpoint.load_pretrained(source='smollm2', tokenizer=tokenizer)


def main(argv):
  del argv
  loaded = load_model()
  model, variables, tokenizer = loaded.model, loaded.variables, loaded.tokenizer
  where = 'given' if _TOKENIZER.value else 'recorded with the model' if (_WORKDIR.value or _CHECKPOINT.value) else \
      'the packaged model\'s'
  print(f'{loaded.description}: tokenizer {spec_of(tokenizer)} ({where})')
  prompts = [tokenizer.encode(p).ids for p in _PROMPTS.value]
  out = generate(model, variables, prompts, _MAX_NEW.value,
                 sampling=SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value),
                 exit_cfg=ExitConfig(_THRESHOLD.value, _CONFIDENCE.value, _KV_FILL.value),
                 stop_tokens=[tokenizer.eos_id])
  for prompt, tokens, exits in zip(_PROMPTS.value, out.tokens, out.exit_loops, strict=True):
    print(f'{prompt!r} -> {tokenizer.decode(tokens)!r}')  # repr: one line per completion, newlines visible.
    print(f'  exit loops: {exits}')


def run() -> None:
  common.run(main)


if __name__ == '__main__':
  run()
