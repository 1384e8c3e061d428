"""Set-up step: extract every corpus, deduplicate, split, and record a manifest.

  python -m rrt_jax.data.prepare            # writes <cache>/prepared/{train,validation,austen,brown,wikipedia}.jsonl

No evaluation text appears in training: training paragraphs that also occur (whitespace-normalised) in any
evaluation corpus are removed, and duplicate training documents are dropped; both are counted in the manifest.
The manifest records package versions, document counts and sha256 of the extracted text; a run whose manifest
differs from the reference one shipped with the package is reported (Debian docs drift with security updates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from rrt_jax.data.corpora import EVAL_CORPORA, TRAIN_CORPORA, Corpus
from rrt_jax.data.packages import cache_dir, cache_lock
from rrt_jax.utils.locking import atomic_file, atomic_write_text, remove_stale_temps

log = logging.getLogger(__name__)

REFERENCE_MANIFEST = os.path.join(os.path.dirname(__file__), 'manifest.json')
VALIDATION_PERCENT = 1  # Of training documents, chosen by a stable hash of their id.
SPLITS = ('train', 'validation', *EVAL_CORPORA)


def prepared_dir(root: str | None = None) -> str:
  return os.path.join(cache_dir(root), 'prepared')


def _paragraph_key(paragraph: str) -> str | None:
  normal = re.sub(r'\s+', ' ', paragraph).strip().lower()
  if len(normal) < 40:  # Short lines (headings, 'Chapter 1') are not evidence of shared text.
    return None
  return hashlib.sha1(normal.encode()).hexdigest()


def _paragraphs(text: str) -> list[str]:
  return re.split(r'\n\s*\n', text)


def decontaminate(train: Corpus, evals: list[Corpus]) -> dict[str, int]:
  """Removes from training every paragraph that occurs in an eval corpus, and duplicate documents."""
  eval_keys = {k for c in evals for _, text in c.documents for p in _paragraphs(text)
               if (k := _paragraph_key(p))}
  stats = {'paragraphs_removed_as_eval_overlap': 0, 'duplicate_documents_removed': 0}
  seen_docs, kept = set(), []
  for doc_id, text in train.documents:
    digest = hashlib.sha1(text.encode()).hexdigest()
    if digest in seen_docs:
      stats['duplicate_documents_removed'] += 1
      continue
    seen_docs.add(digest)
    paragraphs = _paragraphs(text)
    clean = [p for p in paragraphs if _paragraph_key(p) not in eval_keys]
    stats['paragraphs_removed_as_eval_overlap'] += len(paragraphs) - len(clean)
    if clean:
      kept.append((doc_id, '\n\n'.join(clean)))
  train.documents = kept
  return stats


def _is_validation(doc_id: str) -> bool:
  return int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def _write_jsonl(path: str, documents: list[tuple[str, str]]) -> str:
  digest = hashlib.sha256()
  with atomic_file(path, 'w', encoding='utf-8') as f:
    for doc_id, text in documents:
      digest.update(text.encode())
      f.write(json.dumps({'id': doc_id, 'text': text}, ensure_ascii=False) + '\n')
  return digest.hexdigest()


def compare_manifests(got: dict, reference: dict) -> list[str]:
  """Human-readable differences between two manifests (versions and text checksums)."""
  problems = []
  for split, ref in reference.get('splits', {}).items():
    cur = got.get('splits', {}).get(split)
    if cur is None:
      problems.append(f'{split}: missing')
    elif cur['sha256'] != ref['sha256']:
      problems.append(f'{split}: text differs ({cur["documents"]} documents vs {ref["documents"]} in the reference)')
  for package, version in reference.get('versions', {}).items():
    if got.get('versions', {}).get(package) != version:
      problems.append(f'{package}: version {got.get("versions", {}).get(package)} vs {version} in the reference')
  return problems


def _load_manifest(path: str) -> dict | None:
  """The manifest, or None when there is none or it is unreadable (then everything is prepared again)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:  # Cut short by a crash of a version that wrote it in place.
      log.warning('%s is not valid JSON (%s): preparing the corpora again.', path, e)
      return None


def prepare(root: str | None = None, force: bool = False) -> dict:
  """Extracts, decontaminates, splits and writes every corpus; returns the manifest.

  The manifest is written last, atomically: it marks the splits complete. Concurrent callers (one process per
  device, launch/local.py) take <cache>/locks/prepare.lock: one prepares, the others wait and read its manifest.
  """
  out_dir = prepared_dir(root)
  manifest_path = os.path.join(out_dir, 'manifest.json')
  if not force and (manifest := _load_manifest(manifest_path)) is not None:
    return manifest
  with cache_lock('prepare', root, what='corpus preparation (rrt_jax.data.prepare)'):
    if not force and (manifest := _load_manifest(manifest_path)) is not None:
      return manifest  # Another process prepared everything while we waited.
    if force and os.path.exists(manifest_path):
      os.remove(manifest_path)  # Readers must not take the splits for complete while they are rewritten.
    return _prepare(root, out_dir, manifest_path)


def _prepare(root: str | None, out_dir: str, manifest_path: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  evals = [fn(root) for fn in EVAL_CORPORA.values()]
  train = TRAIN_CORPORA['debdocs'](root)
  stats = decontaminate(train, evals)
  splits = {
      'train': [d for d in train.documents if not _is_validation(d[0])],
      'validation': [d for d in train.documents if _is_validation(d[0])],
      **{c.name: c.documents for c in evals},
  }
  manifest = {'versions': {k: v for c in [train, *evals] for k, v in c.versions.items()},
              'skipped_documents': {c.name: c.skipped for c in [train, *evals] if c.skipped},
              'decontamination': stats, 'splits': {}}
  for split, documents in splits.items():
    path = os.path.join(out_dir, f'{split}.jsonl')
    remove_stale_temps(path)  # Under the lock: temporaries of killed runs.
    sha = _write_jsonl(path, documents)
    manifest['splits'][split] = {'documents': len(documents), 'chars': sum(len(t) for _, t in documents),
                                 'sha256': sha}
  remove_stale_temps(manifest_path)
  atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
  for corpus, skipped in manifest['skipped_documents'].items():
    log.warning('%s: skipped %s', corpus, skipped)
  if os.path.exists(REFERENCE_MANIFEST):
    with open(REFERENCE_MANIFEST) as f:
      problems = compare_manifests(manifest, json.load(f))
    for p in problems:
      log.warning('corpus manifest differs from the reference (%s): %s', REFERENCE_MANIFEST, p)
    manifest['differs_from_reference'] = problems
  return manifest


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO)
  print(json.dumps(prepare(force=True), indent=2))
