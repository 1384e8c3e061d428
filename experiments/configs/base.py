"""Defaults shared by every experiment config: rrt_jax/configs/base.py (packaged), re-exported for the
experiments/configs/*.py config files and the code that imports them from here."""

from rrt_jax.configs.base import apply_variant, base_config, paper_config  # noqa: F401
