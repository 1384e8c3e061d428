r"""Early-exit generation from a checkout: `python -m experiments.generate` is the `rrt-generate` console script,
rrt_jax/cli/generate.py (--help shows its flags).

  python -m experiments.generate --prompt="The capital of France is"                 # SmolLM2-135M, vanilla
  python -m experiments.generate --workdir=workdir/main/uptrain --exit_threshold=0.8 --prompt="Once upon"
  python -m experiments.generate --checkpoint=/tmp/ckpt --prompt="..."                # rrt_jax.save output
"""

from rrt_jax.cli.generate import load_model, main, run  # noqa: F401

if __name__ == '__main__':
  run()
