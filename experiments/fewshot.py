r"""Few-shot scoring from a checkout: `python -m experiments.fewshot` (rrt_jax/cli/fewshot.py; --help shows
its flags) scores the packaged SmolLM2; `rrt-eval` / experiments.evaluate scores any checkpoint.

  python -m experiments.fewshot --tasks=analogy_syntactic,austen_lastword --shots=0 --limit=200
  python -m experiments.fewshot --loops=3 --limit=50    # plain recursive conversion (no LoRA): per-loop scores
"""

from rrt_jax.cli.fewshot import main, run  # noqa: F401

if __name__ == '__main__':
  run()
