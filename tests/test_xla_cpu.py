"""rrt_jax.utils.xla_cpu: the XLA:CPU flag the experiments set before the backend starts."""

import subprocess
import sys

import jax.numpy as jnp

from rrt_jax.utils.xla_cpu import YNN_DOTS, prefer_ynn_dots


def test_a_running_backend_or_the_users_choice_is_left_alone():
  jnp.zeros(1).block_until_ready()  # This process's backend is up: the flags were read.
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  assert not prefer_ynn_dots(env) and env == {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  chose_off = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type='}
  assert not prefer_ynn_dots(chose_off) and chose_off['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type='
  chose_on = {'XLA_FLAGS': YNN_DOTS}
  assert prefer_ynn_dots(chose_on) and chose_on == {'XLA_FLAGS': YNN_DOTS}


def test_before_the_backend_the_flag_is_added_and_xla_accepts_it():
  """In a fresh process: the flag joins the others, and XLA starts with it (an unknown flag aborts the process)."""
  code = ('import os; os.environ["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=false"\n'
          'from rrt_jax.utils.xla_cpu import prefer_ynn_dots\n'
          'assert prefer_ynn_dots()\n'
          'import jax.numpy as jnp\n'
          'x = jnp.ones((4, 576)) @ jnp.ones((576, 64))\n'
          'print(os.environ["XLA_FLAGS"], float(x[0, 0]))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['--xla_cpu_enable_fast_math=false', YNN_DOTS, '576.0']
