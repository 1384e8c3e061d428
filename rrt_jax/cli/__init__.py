"""Command-line entry points, installed as console scripts (pyproject [project.scripts]):

  rrt-train     rrt_jax.cli.train      uptraining from an experiment config (= python -m experiments.train)
  rrt-generate  rrt_jax.cli.generate   early-exit generation (= python -m experiments.generate)
  rrt-eval      rrt_jax.cli.fewshot    few-shot scoring at every loop's exit (= python -m experiments.fewshot)
  rrt-export    rrt_jax.cli.export     HF / GGUF export of a trained model (= python -m experiments.export)

Each module defines its absl flags, `main(argv)` and `run()` (the console script); experiments/<name>.py in a
checkout are thin wrappers over them. `common` holds the shared flag handling.
"""
