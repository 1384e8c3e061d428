"""rrt_jax: Relaxed Recursive Transformers (Bae et al., ICLR 2025) in JAX/Flax."""

from rrt_jax.checkpoint import load, save
from rrt_jax.config import InitMethod, Looping, LoraInit, ModelConfig, NormInit, RecursionConfig
from rrt_jax.model import Decoder, init_cache, init_variables

__all__ = ['Decoder', 'InitMethod', 'Looping', 'LoraInit', 'ModelConfig', 'NormInit', 'RecursionConfig',
           'init_cache', 'init_variables', 'load', 'save']
