r"""Issue 27, the small world: the method end to end at a scale 2 CPU cores train to convergence, with serving
measured at matched quality.

  python -m experiments.small_world --workdir=workdir/small_world      # the study (~2.2 h estimated, below)
  python -m experiments.small_world --tiny --workdir=/tmp/small_tiny   # every stage in miniature (< 2 min)

Stages (each writes its result into --workdir and is skipped, with a '[skip]' line, when that result exists; a
result made with other inputs than this run's is an error, as in experiments/repro_study.py, whose `Stages`,
pretraining stage and JSON / variable helpers this reuses; the grid's judge is experiments/repro_claims.judge):
  1. tokenizer/            a byte-level BPE of --vocab tokens trained with the `tokenizers` package on the training
                           split of the packaged corpora (rrt_jax.data; nothing is downloaded), saved as an HF
                           tokenizer directory (tokenizer.json + tokenizer_config.json naming its EOS), used
                           through rrt_jax's 'hf:<dir>' tokenizer spec.
  2. pretrain/             the teacher: rrt_jax.train.loop.train on a random --preset (loops=1, CE only), Orbax
                           checkpoints and resume from the trainer; loss curve, the flatness check (the last quarter
                           of the steps makes < --flat_share of the curve's drop, repro_report.late_drop_share).
  3. converted/<student>   students at --student_share of the teacher's non-embedding parameters (LoRA included,
                           within --size_slack): relaxed recursive CYCLE at each of --loops and MIDDLE_CYCLE (one
                           unique layer at each end) at --middle_loops, shared init --init and LoRA --lora_init
                           ('average' + 'whitened_svd', the main job's recipe, with sequential calibration on
                           --calibration_tokens of training text), each at the largest LoRA rank that fits; and
                           the equal-size baselines: the reduced-size model (the stepwise-chosen L/2 layers run
                           once) and the whitened low-rank compression (rrt_jax.convert.low_rank) at the rank the
                           same budget allows.
  4. uptrained/<s>/seed<n> --uptrain_steps of KD from the teacher + CE + aggressive early-exit losses
                           (rrt_jax.train.loop.uptrain_on_batches; the low-rank baseline trains only its factors),
                           the same batches for every student of a seed; the flatness of every curve.
  5. eval/                 per-loop perplexity on --eval_tokens of each of --corpora (held out), mean ± std over
                           seeds; the teacher's.
  6. serving.json          the teacher (vanilla + continuous sequence-wise batching) against the CYCLE students
                           (seed --serve_seed) under continuous depth-wise batching with early exit, --serve_slots
                           slots, at the fastest threshold of --thresholds that keeps quality (>= --min_agreement of
                           the tokens of the same model's no-exit output, early-exit perplexity within
                           --max_ppl_increase of no exit): experiments/serving_benchmark.py's benchmark and rule.
  7. speculation.json      lossless self-speculative decoding (rrt_jax.serve.speculative) of every CYCLE and
                           middle-cycle student at batch 1 and 4 against greedy no-exit `generate` of the same model
                           (experiments/speculative_bench.speculation_rows): speed, acceptance, exactness.
Then (always, from the stage files; experiments/small_world_report.py): results.json, results.md (the table with
quality beside every speed, the goals held / not held) and the plots pretrain_loss.png, per_loop_ppl.png,
uptraining_curves.png.

Chinchilla arithmetic (Hoffmann et al., 2022: compute-optimal at ~20 tokens per parameter, C ~ 6 N D FLOPs).
The teacher (--preset=small_world_1m: a 6-layer Llama, d=128, MLP 384, GQA 4/2 heads of 32, tied embeddings) has
N = 1.18 M non-embedding parameters (0.52 M embedding at --vocab=4096). A training token costs ~6 x (N + the
0.52 M tied head) = 10.2 MFLOP plus attention. A pretraining step of 32 x 128 = 4,096 tokens through the real
trainer (BPE tokenization in the data pipeline included) took a median 1.03 s (30 steps, below): ~4.0 k tokens/s,
~41 GFLOP/s. One CPU-hour thus trains ~14 M tokens = 12 tokens per parameter, and the defaults take
--pretrain_steps=3,000 x 4,096 = 12.3 M tokens = 10.4 tokens per parameter (C = 1.25e14 FLOPs; a 2 M model at 20
tokens per parameter would take ~3.5 h here): ~0.8 epoch of the 50 MB training split (3.19 bytes per BPE token,
measured on validation). The budget buys tokens rather than width because the goals judge curves that have
flattened. The students (half of N: 0.59 M shared or reduced, LoRA up to 10 % more: 0.59-0.64 M) are uptrained on
--uptrain_steps=150 x 4,096 = 0.61 M tokens each (5.0 % of pretraining). (The defaults were 3,500 and 200 steps,
~2.7 h; they were cut so that the study, with the serving stages, fits a 3-hour session on a machine also used
for other work.)

Time estimate of the defaults, from step times measured on this project's 2-core machine on 2026-12-05 under
`nice -n 19`, load average 1.2-1.6 with the measurement itself (one busy core); earlier the same day at load 2-3
from other jobs the pretraining step took 1.76 s (x1.7), so scale the estimate by the load you see:
  tokenizer  BPE (vocab 4,096) on the whole 50 MB training split, measured                              9 s
  pretrain   3,000 steps x 32 x 128 tokens, 1.03 s / step (median of 30 through rrt_jax.train.loop.train,
             `--pretrain_steps=30 --pretrain_warmup=5 --stop_after=pretrain`)                           52 min
  convert    4 whitened / calibrated conversions (16 k calibration tokens, sequential) + reduced          ~3 min
  uptrain    5 students x 3 seeds x 200 KD steps of 32 x 128 (teacher forward included), per step (median
             of 4 after compiling): relaxed R=2 r=3 1.85 s, R=3 r=17 2.12 s, middle-cycle R=4 r=5 2.23 s,
             reduced 0.97 s, whitened low-rank r=44 1.41 s: 8.58 s per step of all 5, x 450             64 min
  eval       16 models x 2 corpora x 16 k tokens (a forward of 4 k tokens ~0.3 s, plus compiles)        ~3 min
  serving    3 models, 32 requests (prompt 64, decode 32) at 16 slots, CSB + CDB at 5 thresholds, 3
             repeats after a compile run, early-exit perplexity (not timed at full size)                ~6 min
  speculate  2 students x batch 1 and 4 x 5 decodes x 4 runs of 32 tokens (not timed at full size)      ~3 min
  total ~2.2 h at the measured load (~3.5 h at load 2-3: then lower --pretrain_steps / --uptrain_steps, which
  wall time is linear in). Every stage's JSON records its seconds and the pretraining its median step time.
A tiny run (--tiny, every stage) took 92 s from an empty workdir on the same machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments.repro_report import late_drop_share
from experiments.repro_study import (
  Stages,
  json_normal,
  load_variables,
  pretrain,
  pretrain_config,
  save_variables,
  write_json,
)
from experiments.small_world_report import goals, markdown, plot_per_loop, plot_pretrain, plot_uptraining, summarize
from experiments.small_world_settings import PAPER_EXIT_ALPHA, Settings, define_flags, settings

EOS = '<|endoftext|>'
DATA_SEED_OFFSET = 1000  # Uptraining data order of seed s is pipeline seed 1000 + s (pretraining used 0).


# ------------------------------------------------------------------------------------------------------- students


@dataclasses.dataclass(frozen=True)
class Student:
  """One student. group: relaxed | middle | reduced | low_rank; rank: its LoRA rank (the low-rank baseline's
  factor rank; 0 for the reduced model)."""

  name: str
  group: str
  loops: int
  rank: int

  @property
  def slug(self) -> str:
    return ''.join(c if c.isalnum() or c in '.=' else '_' for c in self.name).strip('_')

  @property
  def cycle(self) -> bool:
    """Whether the depth-wise batching engine can serve it (a CYCLE model of several loops)."""
    return self.group == 'relaxed'

  @property
  def drafts_itself(self) -> bool:
    """Whether its first loop is a draft model for self-speculation (CYCLE or middle-cycle, several loops)."""
    return self.group in ('relaxed', 'middle')


def recursion(s: Settings, st: Student):
  from rrt_jax import RecursionConfig
  from rrt_jax.convert.low_rank import low_rank_recursion
  if st.group == 'reduced':
    return RecursionConfig()
  if st.group == 'low_rank':
    return low_rank_recursion(st.rank)
  middle = dict(looping='middle_cycle', unique_layers=1) if st.group == 'middle' else {}
  return RecursionConfig(loops=st.loops, init=s.init, lora_rank=st.rank, lora_init=s.lora_init, **middle)


def student_config(cfg, st: Student):
  """The student's ModelConfig: the teacher's, with L/2 layers for the reduced model."""
  return cfg.replace(num_layers=cfg.num_layers // 2) if st.group == 'reduced' else cfg


def non_embedding(s: Settings, cfg, st: Student) -> int:
  from rrt_jax.convert.low_rank import low_rank_param_count
  from rrt_jax.model import count_params
  if st.group == 'low_rank':  # Its zero kernels are a representation detail, not parameters.
    return low_rank_param_count(cfg, st.rank)
  return count_params(student_config(cfg, st), recursion(s, st)).non_embedding


def budget(s: Settings, cfg) -> int:
  from rrt_jax import RecursionConfig
  from rrt_jax.model import count_params
  return int(count_params(cfg, RecursionConfig()).non_embedding * s.student_share * (1 + s.size_slack))


def _largest_rank(s: Settings, cfg, group: str, loops: int) -> int:
  """The largest LoRA rank whose student fits the budget (the count grows with the rank)."""
  limit, cap = budget(s, cfg), max(cfg.d_model, cfg.mlp_dim)
  fits = lambda r: non_embedding(s, cfg, Student('', group, loops, r)) <= limit  # noqa: E731
  if not fits(1):
    raise ValueError(f'A {group} student of {loops} loops does not fit {s.student_share:.0%} (+{s.size_slack:.0%}) '
                     f'of the teacher\'s non-embedding parameters even at LoRA rank 1: raise --size_slack, or give '
                     '--loops / --middle_loops that share more layers.')
  lo, hi = 1, cap
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return lo


def students(s: Settings, cfg) -> list[Student]:
  """Every student in table order, ranks sized to the budget."""
  from rrt_jax.convert.low_rank import rank_for_budget
  out = []
  for b in s.loops:
    if cfg.num_layers % b or cfg.num_layers // b > cfg.num_layers * s.student_share:
      raise ValueError(f'--loops={b}: must divide the teacher\'s {cfg.num_layers} layers into at most '
                       f'{s.student_share:.0%} of them.')
    r = _largest_rank(s, cfg, 'relaxed', b)
    out.append(Student(f'relaxed R={b} {s.init}+{s.lora_init} r={r}', 'relaxed', b, r))
  for b in s.middle_loops:
    r = _largest_rank(s, cfg, 'middle', b)
    out.append(Student(f'middle-cycle R={b} u=1 {s.init}+{s.lora_init} r={r}', 'middle', b, r))
  if 'reduced' in s.baselines:
    out.append(Student(f'reduced ({cfg.num_layers // 2} layers, stepwise)', 'reduced', 2, 0))
  if 'low_rank' in s.baselines:
    r = rank_for_budget(cfg, budget(s, cfg))
    out.append(Student(f'whitened low-rank r={r}', 'low_rank', 1, r))
  return out


# ---------------------------------------------------------------------------------------------------- the stages


def train_bpe(s: Settings, directory: str) -> dict:
  """Stage 1: a byte-level BPE on the training split, saved as an HF tokenizer directory."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from rrt_jax.data.tfds_builder import text_source
  source = text_source('train')
  count = min(len(source), s.tokenizer_docs or len(source))
  texts = (source[i]['text'].decode() for i in range(count))
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=s.vocab, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer, length=count)
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': EOS}, f)
  return {'vocab_size': tokenizer.get_vocab_size(), 'documents': count,
          'bytes_per_token': bytes_per_token(tokenizer, 'validation')}


def bytes_per_token(tokenizer, split: str, max_bytes: int = 200_000) -> float:
  from rrt_jax.data.tfds_builder import text_source
  source = text_source(split)
  text = b''.join(source[i]['text'] for i in range(min(len(source), 50)))[:max_bytes].decode(errors='ignore')
  return len(text.encode()) / max(1, len(tokenizer.encode(text).ids))


def curve_flatness(losses, flat_share: float) -> dict:
  """late_drop_share of a loss curve ([T] or [seeds, T]) and whether it is under flat_share."""
  share = late_drop_share(np.atleast_2d(np.asarray(losses, np.float64)))
  return {'late_drop_share': None if math.isnan(share) else share,
          'flat': bool(math.isfinite(share) and share < flat_share)}


def chinchilla(s: Settings, cfg, steps_done: int) -> dict:
  from rrt_jax import RecursionConfig
  from rrt_jax.model import count_params
  count = count_params(cfg, RecursionConfig())
  tokens = steps_done * s.pretrain_batch * s.seq_len
  return {'non_embedding_params': count.non_embedding, 'embedding_params': count.embedding, 'tokens': tokens,
          'tokens_per_param': tokens / count.non_embedding,
          'train_flops': 6 * (count.non_embedding + count.embedding) * tokens}


def per_loop(model, variables: dict, windows: dict, batch_size: int) -> dict:
  """{corpus: {'ppl': [per exit]}} on held-out windows (BPE tokens: perplexity per token)."""
  from rrt_jax.eval.perplexity import per_loop_perplexity
  return {c: {'ppl': per_loop_perplexity(model, variables, w, batch_size=batch_size), 'tokens': w.num_tokens}
          for c, w in windows.items()}


class SmallWorld:
  """Lazily loaded inputs (a rerun that skips every stage loads no model and compiles nothing)."""

  def __init__(self, s: Settings):
    self.s = s
    self.stages = Stages(s.workdir)
    self.tokenizer_dir = os.path.abspath(self.stages.path('tokenizer'))
    self.pretrain_dir = self.stages.path('pretrain')

  @functools.cached_property
  def tokenizer(self):
    from rrt_jax.pretrained.tokenizer import make_tokenizer
    return make_tokenizer('hf:' + self.tokenizer_dir)

  @functools.cached_property
  def cfg(self):
    from rrt_jax.checkpoint import read_configs
    return read_configs(self.pretrain_dir, 'holds no pretraining run')[0]

  @functools.cached_property
  def teacher(self):
    from rrt_jax import Decoder
    variables = jax.tree.map(jax.numpy.asarray, load_variables(os.path.join(self.pretrain_dir, 'pretrained.msgpack')))
    return Decoder(self.cfg), variables

  @functools.cached_property
  def windows(self) -> dict:
    from rrt_jax.eval.perplexity import heldout_windows
    return {c: heldout_windows(self.tokenizer, c, self.s.eval_tokens, window=self.s.seq_len) for c in self.s.corpora}

  @functools.cache  # noqa: B019  (one study per process)
  def calibration(self):
    from rrt_jax.convert.calibration import CalibrationConfig, calibration_batches
    from rrt_jax.data.tfds_builder import text_source
    config = CalibrationConfig(tokens=self.s.calibration_tokens, seq_len=self.s.seq_len, batch_size=4,
                               sequential=True)
    return calibration_batches(text_source('train'), self.tokenizer, config, self.cfg.max_seq_len), config

  @functools.cache  # noqa: B019
  def batches(self, seed: int) -> list[dict]:
    from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
    from rrt_jax.data.tfds_builder import text_source
    config = PipelineConfig(self.s.seq_len, self.s.batch, seed=DATA_SEED_OFFSET + seed)
    it = iter(lm_dataset(text_source('train'), self.tokenizer, config, max_seq_len=self.cfg.max_seq_len,
                         vocab_size=self.cfg.vocab_size))
    return [jax.tree.map(np.asarray, next(it)) for _ in range(self.s.uptrain_steps)]

  def heldout_ids(self, corpus: str = 'austen') -> list[int]:
    from rrt_jax.data.tfds_builder import text_source
    source = text_source(corpus)
    return self.tokenizer.encode(source[0]['text'].decode()).ids

  # ------------------------------------------------------------------------------------------------ inputs

  def tokenizer_inputs(self) -> dict:
    return {'vocab': self.s.vocab, 'tokenizer_docs': self.s.tokenizer_docs}

  def pretrain_inputs(self) -> dict:
    s = self.s
    return {**self.tokenizer_inputs(), 'preset': s.preset, 'steps': s.pretrain_steps, 'batch': s.pretrain_batch,
            'lr': s.pretrain_lr, 'warmup': s.pretrain_warmup, 'seq_len': s.seq_len}

  def eval_inputs(self) -> dict:
    return {'eval_tokens': self.s.eval_tokens, 'corpora': self.s.corpora, 'seq_len': self.s.seq_len}

  def conversion_inputs(self, st: Student) -> dict:
    s = self.s
    return {'pretrain': self.pretrain_inputs(), 'student': dataclasses.asdict(st), 'init': s.init,
            'lora_init': s.lora_init, 'calibration_tokens': s.calibration_tokens}

  # ------------------------------------------------------------------------------------------------ stages

  def run(self) -> dict:
    s, st = self.s, self.stages
    tok = st.run('tokenizer', st.path('tokenizer', 'result.json'), self.tokenizer_inputs(),
                 lambda: train_bpe(s, self.tokenizer_dir))
    if flags.FLAGS.stop_after == 'tokenizer':
      return {'tokenizer': tok}
    pre = st.run('pretrain teacher', st.path('pretrain', 'loss_curve.json'), self.pretrain_inputs(), self.pretrain)
    if flags.FLAGS.stop_after == 'pretrain':
      return {'tokenizer': tok, 'pretrain': pre}
    teacher_eval = st.run('eval teacher', st.path('eval', 'teacher.json'),
                          {'pretrain': self.pretrain_inputs(), **self.eval_inputs()},
                          lambda: per_loop(*self.teacher, self.windows, s.eval_batch))
    rows = [self.run_student(student) for student in students(s, self.cfg)]
    served = [r for r in rows if r['cycle']]
    serving = st.run('serving', st.path('serving.json'), self.serving_inputs(served), lambda: self.serve(served))
    drafting = [r for r in rows if Student(**r['spec']).drafts_itself]
    spec = st.run('self-speculation', st.path('speculation.json'), self.speculation_inputs(drafting),
                  lambda: self.speculate(drafting))
    return {'tokenizer': tok, 'pretrain': pre, 'teacher': teacher_eval, 'rows': rows, 'serving': serving,
            'speculation': spec}

  def pretrain(self) -> dict:
    config = pretrain_config(self.s)
    config.data.tokenizer = 'hf:' + self.tokenizer_dir
    out = pretrain(self.s, self.pretrain_dir, config)
    cfg = self.cfg
    return {**out, 'chinchilla': chinchilla(self.s, cfg, out['step']),
            'flatness': curve_flatness(out['curve']['loss'], self.s.flat_share)}

  def run_student(self, student: Student) -> dict:
    from rrt_jax import Decoder
    s, st = self.s, self.stages
    conv_inputs = self.conversion_inputs(student)
    conv_path = st.path('converted', student.slug + '.msgpack')

    def convert_stage():
      save_variables(conv_path, self.convert(student))
      return {'non_embedding_params': non_embedding(s, self.cfg, student)}

    row = {'model': student.name, 'group': student.group, 'cycle': student.cycle, 'spec': dataclasses.asdict(student),
           **st.run(f'convert {student.name}', st.path('converted', student.slug + '.json'), conv_inputs,
                    convert_stage)}
    model = Decoder(student_config(self.cfg, student), recursion(s, student))
    row['seeds'] = {}
    for seed in s.seeds:
      up_inputs = {**conv_inputs, 'seed': seed, 'steps': s.uptrain_steps, 'batch': s.batch, 'lr': s.uptrain_lr,
                   **self.exit_inputs()}
      up_path = st.path('uptrained', student.slug, f'seed{seed}.msgpack')

      def uptrain_stage(seed=seed, up_path=up_path):
        from rrt_jax.train.loop import uptrain_on_batches
        trainable = ('lora',) if student.group == 'low_rank' else None  # Its kernels stay zero: its size holds.
        variables, losses = uptrain_on_batches(model, load_variables(conv_path), *self.teacher, self.batches(seed),
                                               s.uptrain_lr, trainable=trainable, exit_alpha=s.exit_alpha)
        save_variables(up_path, variables)
        return {'losses': losses, 'tokens': s.uptrain_steps * s.batch * s.seq_len,
                'flatness': curve_flatness(losses, s.flat_share)}

      trained = st.run(f'uptrain {student.name} seed {seed}', st.path('uptrained', student.slug, f'seed{seed}.json'),
                       up_inputs, uptrain_stage)
      scores = st.run(f'eval {student.name} seed {seed}', st.path('eval', student.slug, f'seed{seed}.json'),
                      {**up_inputs, **self.eval_inputs()},
                      lambda up_path=up_path: per_loop(model, load_variables(up_path), self.windows, s.eval_batch))
      row['seeds'][str(seed)] = {'losses': trained['losses'], 'flatness': trained['flatness'],
                                 'uptrain_seconds': trained['seconds'], 'eval': {c: scores[c] for c in s.corpora}}
    row['summary'] = summarize(row, s.corpora)
    row['flatness'] = curve_flatness([x['losses'] for x in row['seeds'].values()], s.flat_share)
    return row

  def convert(self, student: Student) -> dict:
    from rrt_jax import RecursionConfig
    from rrt_jax.convert import to_recursive
    from rrt_jax.convert.calibration import collect_grams, convert
    from rrt_jax.convert.low_rank import low_rank_compress
    _, vanilla = self.teacher
    if student.group == 'reduced':  # The stepwise-chosen L/2 layers: a Stepwise R=2 model's shared layers, once.
      return to_recursive(vanilla, self.cfg, RecursionConfig(loops=2, init='stepwise'))
    batches, config = self.calibration()
    if student.group == 'low_rank':
      stats = collect_grams(self.cfg, vanilla, batches, config, self.stages.path('calibration'), progress=False)
      return low_rank_compress(vanilla, self.cfg, stats, student.rank)[1]
    return convert(vanilla, self.cfg, recursion(self.s, student), batches, config, progress=False)

  def student_model(self, row: dict, seed: int):
    from rrt_jax import Decoder
    student = Student(**row['spec'])
    variables = load_variables(self.stages.path('uptrained', student.slug, f'seed{seed}.msgpack'))
    return Decoder(student_config(self.cfg, student), recursion(self.s, student)), jax.tree.map(jax.numpy.asarray,
                                                                                              variables)

  def exit_inputs(self) -> dict:
    """The exit-loss weight among a stage's inputs when it is not the paper's (so workdirs made before the flag
    existed still resume)."""
    return {} if self.s.exit_alpha == PAPER_EXIT_ALPHA else {'exit_alpha': self.s.exit_alpha}

  def serving_inputs(self, served: list[dict]) -> dict:
    s = self.s
    return {'pretrain': self.pretrain_inputs(), 'models': [r['model'] for r in served], 'seed': s.serve_seed,
            'uptrain_steps': s.uptrain_steps, **self.exit_inputs(), 'slots': s.serve_slots,
            'requests': s.serve_requests,
            'prompt_len': s.serve_prompt_len, 'decode_len': s.serve_decode_len, 'thresholds': s.thresholds,
            'min_agreement': s.min_agreement, 'max_ppl_increase': s.max_ppl_increase,
            'eval_tokens': s.serve_eval_tokens, 'repeats': s.serve_repeats}

  def serve(self, served: list[dict]) -> dict:
    """CDB with early exit on the CYCLE students against the teacher + CSB, at matched quality."""
    from experiments import serving_benchmark as sb
    from rrt_jax.eval.perplexity import sliding_windows
    from rrt_jax.serve.engine import Request
    s = self.s
    ids = self.heldout_ids('austen')
    starts = np.random.default_rng(0).integers(0, len(ids) // 2 - s.serve_prompt_len, s.serve_requests)
    requests = [Request(ids[i:i + s.serve_prompt_len], s.serve_decode_len) for i in starts]
    windows = sliding_windows(ids[len(ids) // 2:][:s.serve_eval_tokens + 1], s.seq_len)  # Apart from the prompts.
    models = {'vanilla (teacher)': self.teacher}  # First: every student's vanilla reference.
    models.update({r['model']: self.student_model(r, s.serve_seed) for r in served})
    rows, _ = sb.benchmark(models, requests, windows, list(s.thresholds), s.serve_slots, s.serve_repeats)
    selection = sb.select_thresholds(rows, s.min_agreement, s.max_ppl_increase)
    for r in rows:
      r.pop('tokens')
    return {'rows': rows, 'selection': {n: {k: v for k, v in x.items() if k != 'row'} for n, x in selection.items()},
            'markdown': sb.selection_markdown(selection)}

  def speculation_inputs(self, drafting: list[dict]) -> dict:
    s = self.s
    return {'pretrain': self.pretrain_inputs(), 'models': [r['model'] for r in drafting], 'seed': s.serve_seed,
            'uptrain_steps': s.uptrain_steps, **self.exit_inputs(), 'batches': s.spec_batches,
            'draft_lens': s.spec_draft_lens,
            'new_tokens': s.spec_new_tokens, 'prompt_len': s.serve_prompt_len, 'repeats': s.spec_repeats}

  def speculate(self, drafting: list[dict]) -> dict:
    from experiments.speculative_bench import speculation_rows
    s = self.s
    ids = self.heldout_ids('austen')
    starts = np.random.default_rng(1).integers(0, len(ids) - s.serve_prompt_len, max(s.spec_batches))
    prompts = [ids[i:i + s.serve_prompt_len] for i in starts]
    out = {}
    for r in drafting:
      model, variables = self.student_model(r, s.serve_seed)
      out[r['model']] = speculation_rows(model, variables, prompts, s.spec_new_tokens, s.spec_batches, (1,),
                                         s.spec_draft_lens, s.spec_repeats)
    return {'models': out}


def main(argv):
  del argv
  from rrt_jax.utils.xla_cpu import prefer_ynn_dots
  prefer_ynn_dots()  # Before the backend starts.
  s = settings()
  os.makedirs(s.workdir, exist_ok=True)
  if s.tiny:  # (Before the backend starts.) A few steps each: compile time is all that counts, so compile fast.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0 '
                               '--xla_llvm_disable_expensive_passes=true').strip()
  jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(s.workdir), 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from rrt_jax.utils.timing import machine_description
  print(f'# small world{" (tiny)" if s.tiny else ""}: {machine_description()}', flush=True)
  t0 = time.perf_counter()
  study = SmallWorld(s)
  results = study.run()
  if 'rows' not in results:  # --stop_after.
    print(json.dumps({k: {n: v for n, v in r.items() if n != 'curve'} for k, r in results.items()}, indent=1))
    return
  results['settings'] = json_normal(dataclasses.asdict(s))
  results['goals'] = goals(results, s)
  report = markdown(results, s)
  print('\n' + report, flush=True)
  write_json(study.stages.path('results.json'), results)
  with open(study.stages.path('results.md'), 'w') as f:
    f.write(report + '\n')
  plot_pretrain(results['pretrain'], study.stages.path('pretrain_loss.png'))
  plot_per_loop(results, s.corpora, study.stages.path('per_loop_ppl.png'))
  plot_uptraining(results, study.stages.path('uptraining_curves.png'))
  print(f'stages: {study.stages.ran} run, {study.stages.skipped} skipped; {time.perf_counter() - t0:.1f} s. '
        f'Wrote {s.workdir}/results.json, results.md, pretrain_loss.png, per_loop_ppl.png, uptraining_curves.png',
        flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
