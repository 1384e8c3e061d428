r"""HF / GGUF export from a checkout: `python -m experiments.export` is the `rrt-export` console script,
rrt_jax/cli/export.py (--help shows its flags).

  python -m experiments.export --workdir=workdir/main/uptrain --out=/tmp/rrt_hf --format=hf
  python -m experiments.export --workdir=workdir/main/uptrain --out=/tmp/rrt.gguf --format=gguf --step=200
  python -m experiments.export --workdir=/tmp/ckpt --out=/tmp/rrt_hf        # an rrt_jax.save directory works too
"""

from rrt_jax.cli.export import gguf_path, main, run, validate  # noqa: F401

if __name__ == '__main__':
  run()
