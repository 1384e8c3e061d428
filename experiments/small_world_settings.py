"""The small world's flags and their resolved values (experiments/small_world.py): --tiny's values for the flags not
given, lists parsed, in one frozen Settings."""

from __future__ import annotations

import dataclasses

from absl import flags

PAPER_EXIT_ALPHA = 0.1  # Agg(0.1), rrt_jax.train.step.LossConfig's default (not imported: start-up stays light).


def define_flags() -> None:
  """The study's flags (defined by the script only: importing this module defines none)."""
  f = flags
  f.DEFINE_string('workdir', 'workdir/small_world', 'Where every stage, table and plot goes.')
  f.DEFINE_bool('tiny', False, 'Every stage in miniature (< 2 min); flags given explicitly still win.')
  f.DEFINE_enum('stop_after', '', ['', 'tokenizer', 'pretrain'], 'Stop after this stage (e.g. to time it; the '
                'pretraining result records its median step time).')
  f.DEFINE_integer('vocab', 4096, 'BPE vocabulary size (trained on the training split).')
  f.DEFINE_integer('tokenizer_docs', 0, 'Training documents the BPE learns from (0 = the whole split).')
  f.DEFINE_string('preset', 'small_world_1m', 'Teacher architecture (rrt_jax.presets; vocab from the BPE).')
  f.DEFINE_integer('seq_len', 128, 'Sequence length of pretraining, uptraining, calibration and eval windows.')
  f.DEFINE_integer('pretrain_steps', 3000, 'Teacher pretraining steps (see the Chinchilla arithmetic).')
  f.DEFINE_integer('pretrain_batch', 32, 'Sequences per pretraining step.')
  f.DEFINE_float('pretrain_lr', 3e-3, 'Peak pretraining learning rate (cosine decay to 10 %).')
  f.DEFINE_integer('pretrain_warmup', 100, 'Pretraining warmup steps.')
  f.DEFINE_float('flat_share', 0.02, 'A curve is flat when its last quarter makes less than this share of its drop.')
  f.DEFINE_float('student_share', 0.5, "Students' non-embedding size as a share of the teacher's.")
  f.DEFINE_float('size_slack', 0.1, 'LoRA may take the students up to (1 + slack) x their share.')
  f.DEFINE_list('loops', ['2', '3'], 'Loops of the relaxed CYCLE students (each must divide the teacher\'s layers '
                'into half of them or fewer).')
  f.DEFINE_list('middle_loops', ['4'], 'Loops of the MIDDLE_CYCLE students (unique_layers=1; "" = none).')
  f.DEFINE_string('init', 'average', 'Shared-layer init of the students.')
  f.DEFINE_string('lora_init', 'whitened_svd', 'LoRA init of the students.')
  f.DEFINE_list('baselines', ['reduced', 'low_rank'], 'Equal-size baselines.')
  f.DEFINE_integer('calibration_tokens', 16_384, 'Calibration tokens (training split) of whitened SVD.')
  f.DEFINE_integer('uptrain_steps', 150, 'Uptraining steps per student and seed.')
  f.DEFINE_integer('batch', 32, 'Sequences per uptraining step.')
  f.DEFINE_float('uptrain_lr', 1e-3, 'Peak uptraining learning rate.')
  f.DEFINE_float('exit_alpha', PAPER_EXIT_ALPHA, 'Uptraining loss weight of each exit before the last (the '
                 "paper's aggressive Agg(alpha); the last weighs 1). Higher trains the early loops harder: at 1.0 "
                 "loop 1's draft acceptance rose 30 -> 69 % and confidence exits barely moved (BUILD_NOTES).")
  f.DEFINE_list('seeds', ['0', '1', '2'], 'Data-order seeds of uptraining.')
  f.DEFINE_list('corpora', ['validation', 'austen'], 'Held-out corpora (TFDS splits).')
  f.DEFINE_integer('eval_tokens', 16_384, 'Held-out tokens scored per corpus.')
  f.DEFINE_integer('eval_batch', 16, 'Windows per perplexity batch.')
  f.DEFINE_integer('serve_seed', 0, 'The seed whose students are served.')
  f.DEFINE_integer('serve_slots', 16, 'Engine slots (enough that compute, not dispatch, dominates).')
  f.DEFINE_integer('serve_requests', 32, 'Requests served (all arrive at once).')
  f.DEFINE_integer('serve_prompt_len', 64, 'Prompt tokens per request (held-out Austen).')
  f.DEFINE_integer('serve_decode_len', 32, 'Generated tokens per request.')
  f.DEFINE_list('thresholds', ['1.0', '0.95', '0.9', '0.8', '0.7'], 'Exit thresholds swept.')
  f.DEFINE_float('min_agreement', 0.9, 'Matched quality: least agreement with the no-exit output.')
  f.DEFINE_float('max_ppl_increase', 0.05, 'Matched quality: most early-exit perplexity increase over no exit.')
  f.DEFINE_integer('serve_eval_tokens', 4096, 'Held-out tokens of the early-exit perplexity when serving.')
  f.DEFINE_integer('serve_repeats', 3, 'Interleaved serving repeats (median).')
  f.DEFINE_list('spec_batches', ['1', '4'], 'Batch sizes of self-speculation.')
  f.DEFINE_list('spec_draft_lens', ['2', '3', '4'], 'Draft lengths of self-speculation (draft = loop 1).')
  f.DEFINE_integer('spec_new_tokens', 32, 'Tokens generated per row when timing self-speculation.')
  f.DEFINE_integer('spec_repeats', 3, 'Interleaved self-speculation repeats (median).')


TINY = dict(vocab=320, tokenizer_docs=100, preset='tiny_llama', seq_len=64, pretrain_steps=8, pretrain_batch=4,
            pretrain_warmup=2, calibration_tokens=256, uptrain_steps=3, batch=4, seeds=['0', '1'],
            eval_tokens=256, eval_batch=4, serve_slots=4, serve_requests=4, serve_prompt_len=16, serve_decode_len=6,
            thresholds=['1.0', '0.5'], serve_eval_tokens=128, serve_repeats=1, spec_batches=['1', '2'],
            spec_draft_lens=['2'], spec_new_tokens=6, spec_repeats=1)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved flags (--tiny's values for flags not given explicitly); attribute names match
  repro_study.pretrain_config's."""

  workdir: str
  tiny: bool
  vocab: int
  tokenizer_docs: int
  preset: str
  seq_len: int
  pretrain_steps: int
  pretrain_batch: int
  pretrain_lr: float
  pretrain_warmup: int
  flat_share: float
  student_share: float
  size_slack: float
  loops: tuple[int, ...]
  middle_loops: tuple[int, ...]
  init: str
  lora_init: str
  baselines: tuple[str, ...]
  calibration_tokens: int
  uptrain_steps: int
  batch: int
  uptrain_lr: float
  exit_alpha: float
  seeds: tuple[int, ...]
  corpora: tuple[str, ...]
  eval_tokens: int
  eval_batch: int
  serve_seed: int
  serve_slots: int
  serve_requests: int
  serve_prompt_len: int
  serve_decode_len: int
  thresholds: tuple[float, ...]
  min_agreement: float
  max_ppl_increase: float
  serve_eval_tokens: int
  serve_repeats: int
  spec_batches: tuple[int, ...]
  spec_draft_lens: tuple[int, ...]
  spec_new_tokens: int
  spec_repeats: int


_LISTS = {'loops': int, 'middle_loops': int, 'baselines': str, 'seeds': int, 'corpora': str, 'thresholds': float,
          'spec_batches': int, 'spec_draft_lens': int}


def settings() -> Settings:
  def value(name):
    if flags.FLAGS.tiny and name in TINY and not flags.FLAGS[name].present:
      raw = TINY[name]
    else:
      raw = flags.FLAGS[name].value
    return tuple(_LISTS[name](x) for x in raw if str(x)) if name in _LISTS else raw

  return Settings(**{f.name: value(f.name) for f in dataclasses.fields(Settings)})


__all__ = ['PAPER_EXIT_ALPHA', 'TINY', 'Settings', 'define_flags', 'settings']
