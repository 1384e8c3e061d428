import os

# XLA's compiled programs persist across the tests' processes (the xdist workers, the CLI subprocesses) and runs:
# the same tiny models compile the same programs in many tests. Set before jax is imported, so subprocesses
# inherit it. RRT_JAX_TEST_COMPILE_CACHE='' turns it off.
_COMPILE_CACHE = os.environ.setdefault('RRT_JAX_TEST_COMPILE_CACHE', os.path.join(
    os.environ.get('RRT_DATA_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'rrt_jax')), 'jax_compile_cache'))
if _COMPILE_CACHE:
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _COMPILE_CACHE)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # Nothing is downloaded: every checkpoint is built locally.

FAMILIES = ('gemma', 'llama', 'gpt_neox')


@pytest.fixture(scope='session')
def tiny_hf(tmp_path_factory):
  """{family: (directory, torch model)} of tiny random HF checkpoints saved locally."""
  from hf_fixtures import save_tiny
  root = tmp_path_factory.mktemp('hf')
  return {f: (str(root / f), save_tiny(f, str(root / f), seed=i)) for i, f in enumerate(FAMILIES)}


def pytest_collection_modifyitems(config, items):
  """Tests marked `longest` run first. The slow set is spread over two workers (`--dist worksteal` in .ci/run): the
  longest tests must start at once, so that the other worker's short tests fill the time around them instead of
  one of them starting last and running alone."""
  items.sort(key=lambda item: item.get_closest_marker('longest') is None)  # Stable: the rest keep their order.
