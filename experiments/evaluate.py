r"""Evaluating a trained checkpoint at every exit from a checkout: `python -m experiments.evaluate` is the
`rrt-eval` console script, rrt_jax/cli/evaluate.py (--help shows its flags).

  python -m experiments.evaluate --workdir=workdir/main/uptrain
"""

from rrt_jax.cli.evaluate import main, run  # noqa: F401

if __name__ == '__main__':
  run()
