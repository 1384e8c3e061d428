r"""Export a trained recursive / relaxed model as a plain HF transformers checkpoint or a llama.cpp GGUF file:
`rrt-export`, or from a checkout `python -m experiments.export`.

  rrt-export --workdir=workdir/main/uptrain --out=/tmp/rrt_hf --format=hf
  rrt-export --workdir=workdir/main/uptrain --out=/tmp/rrt.gguf --format=gguf --step=200
  rrt-export --workdir=/tmp/ckpt --out=/tmp/rrt_hf        # an rrt_jax.save directory works too

What is written is the final exit as a plain model (rrt_jax.export.unroll): no sharing, no per-loop LoRA, no early
exit. Prints the files written and what was left out (e.g. the bytes tokenizer, which has no tokenizer.json).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from rrt_jax.cli import common

_WORKDIR = flags.DEFINE_string('workdir', '', 'A training workdir (or a directory written by rrt_jax.save).')
_OUT = flags.DEFINE_string('out', '', 'hf: the output directory. gguf: the .gguf file, or a directory for '
                           'model.gguf in it.')
_FORMAT = flags.DEFINE_enum('format', 'hf', ['hf', 'gguf'], 'hf: safetensors + config.json + tokenizer; gguf: '
                            'llama.cpp (Llama family only).')
_STEP = flags.DEFINE_integer('step', None, 'The checkpoint step of the training workdir (default: the latest).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'float16', 'bfloat16', 'param'],
                           'Tensor dtype; param = the model\'s param_dtype (hf only; gguf takes float32 or float16).')


def gguf_path(out: str) -> str:
  return out if out.endswith('.gguf') else os.path.join(out, 'model.gguf')


def validate() -> None:
  if not _WORKDIR.value:
    raise ValueError('--workdir is required: a training workdir or an rrt_jax.save directory.')
  if not _OUT.value:
    raise ValueError('--out is required: where to write the export.')
  if _FORMAT.value == 'gguf' and _DTYPE.value not in ('float32', 'float16'):
    raise ValueError(f'--dtype={_DTYPE.value}: GGUF export writes float32 or float16.')


def main(argv) -> None:
  del argv
  try:
    from rrt_jax.export import to_gguf, to_hf
  except ImportError as e:  # An install without the export module (or one of its dependencies): say so in one line.
    print(f'export: rrt_jax.export cannot be imported ({e}); reinstall rrt_jax.', file=sys.stderr)
    sys.exit(1)
  dtype = None if _DTYPE.value == 'param' else _DTYPE.value
  try:
    if _FORMAT.value == 'hf':
      result = to_hf(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=dtype)
    else:
      result = to_gguf(_WORKDIR.value, gguf_path(_OUT.value), step=_STEP.value, dtype=dtype)
  except (FileNotFoundError, ValueError) as e:  # No such run or step, a model the format cannot hold: one line.
    print(f'export: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'wrote {result.path}: {", ".join(result.files)}')
  for note in result.notes:
    print(f'  note: {note}')


def run() -> None:
  common.run(main, validate=validate)


if __name__ == '__main__':
  run()
