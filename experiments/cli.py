"""The absl entry-point helpers, rrt_jax/cli/common.py (one-line usage errors, --config names, a --help that exits
0), under the name the experiments' scripts import."""

from rrt_jax.cli.common import USAGE_ERROR, QuietLibraries, accept_config_names, parse_flags, run  # noqa: F401
