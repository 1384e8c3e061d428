"""SmolLM2-135M (the packaged GGUF) -> Relaxed Recursive with the project's recipe: Average shared layers,
whitened-SVD LoRA from sequential calibration, layer-wise healing, then KD + early-exit uptraining on the
Debian docs.

  python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average --workdir=workdir/smollm2
  # The paper's weight-space SVD init without healing: variant b3_r64_average_svd --config.healing.steps_per_layer=0

The config itself is rrt_jax/configs/smollm2.py (packaged; `rrt-train --config=smollm2:...`).
"""

from rrt_jax.configs.smollm2 import get_config  # noqa: F401  (this file is a config file too)
