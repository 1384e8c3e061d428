"""Export: a recursive or relaxed model as an ordinary vanilla checkpoint that other tools load.

  from rrt_jax.export import to_gguf, to_hf
  to_hf('workdir/main/uptrain', '/tmp/rrt_hf')             # HF transformers: AutoModelForCausalLM.from_pretrained
  to_gguf('workdir/main/uptrain', '/tmp/rrt.gguf')         # llama.cpp GGUF (Llama family)

What is written is the model's final exit as a plain model of cfg.num_layers layers (`unroll`): every depth position
gets its shared layer with its own LoRA and vector deltas merged in. The sharing, the per-loop LoRA structure and
early exit do not survive: the file is as large as the original model and runs every layer.
"""

from rrt_jax.export.gguf import permute_qk, to_gguf
from rrt_jax.export.hf import hf_config, state_dict, to_hf
from rrt_jax.export.source import ExportResult, LoadedModel, load_source
from rrt_jax.export.unroll import merge_layer, unroll

__all__ = ['ExportResult', 'LoadedModel', 'hf_config', 'load_source', 'merge_layer', 'permute_qk', 'state_dict',
           'to_gguf', 'to_hf', 'unroll']
