"""The tour notebook runs top to bottom (nbclient, python3 kernel) on a tiny training run's checkpoint."""

import math
import os
import re

import nbformat
from nbclient import NotebookClient

from experiments.configs import tiny_cpu
from rrt_jax.data.tfds_builder import text_source
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'notebooks', 'tour.ipynb')


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == kind]


def test_tour_notebook_runs_on_a_training_checkpoint(tmp_path, monkeypatch):
  c = tiny_cpu.get_config()  # Byte tokenizer, 2 loops, LoRA rank 8.
  c.train.steps = c.checkpoint.every_steps = 2
  c.log_every = 1
  c.checkpoint.async_save = False
  train(c, str(tmp_path), source=text_source('validation'), tokenizer=ByteTokenizer())

  monkeypatch.setenv('RRT_NOTEBOOK_WORKDIR', str(tmp_path))
  # Threshold 0: every generated token exits after loop 1, so the exit loops shown must all be 1 (the untrained
  # model is never confident, so the default threshold would show only the last loop and test nothing).
  monkeypatch.setenv('RRT_NOTEBOOK_EXIT_THRESHOLD', '0.0')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  NotebookClient(nb, timeout=180, kernel_name='python3', resources={'metadata': {'path': ROOT}}).execute()

  text = ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stdout')
  assert re.search(r'^step 2$', text, re.M)
  assert re.search(r'^non-embedding parameters: \d+\.\d% of the original$', text, re.M)
  ppl = dict(re.findall(r'^loop (\d+): perplexity (\S+)$', text, re.M))
  assert sorted(ppl) == ['1', '2'], text
  assert all(math.isfinite(float(p)) and float(p) > 1 for p in ppl.values()), ppl
  exits = [eval(line) for line in re.findall(r'^  exit loops: (\[.*\])$', text, re.M)]
  assert len(exits) == 3 and all(0 < len(e) <= 48 and set(e) == {1} for e in exits), exits
  assert 'mean exit loop 1.00 of 2' in text
  images = [o for o in _outputs(nb, 'display_data') if 'image/png' in o.data]
  assert len(images) == 2  # Per-loop perplexity and the exit-loop histogram.
