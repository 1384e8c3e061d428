"""Configs as data: the architecture of a decoder LM and how it is made recursive.

Both are frozen dataclasses, hashable, so they can be static arguments of jitted functions.
Validation happens in `__post_init__` so a bad value fails where it is written, with the fix named.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence


class Family(enum.StrEnum):
  """The decoder families one ModelConfig covers (they differ in norms, MLP, rotary and residual layout)."""

  GEMMA = 'gemma'
  LLAMA = 'llama'
  GPT_NEOX = 'gpt_neox'


class NormType(enum.StrEnum):
  RMS = 'rms'
  RMS_ONE_PLUS = 'rms_one_plus'  # Gemma's RMSNorm with scale (1 + w).
  LAYER = 'layer'


class MlpType(enum.StrEnum):
  SWIGLU = 'swiglu'
  GEGLU = 'geglu'
  GELU = 'gelu'  # Ungated (GPT-NeoX).


class RematPolicy(enum.StrEnum):
  """What each layer keeps for the backward pass; the rest is recomputed (jax.checkpoint_policies)."""

  NONE = 'none'  # No rematerialisation: keep everything.
  FULL = 'full'  # Keep nothing: recompute the whole layer.
  DOTS = 'dots'  # Keep matmul outputs.
  DOTS_NO_BATCH = 'dots_no_batch'  # Keep outputs of matmuls without batch dimensions.


class Looping(enum.StrEnum):
  """How the B loops visit the K shared layers (Takase & Kiyono, 2021).

  CYCLE: depth position l = b*K + k uses shared layer k (1..K, 1..K, ...); each loop ends in a complete
    hidden state, so every loop can be an exit. The paper's pattern.
  SEQUENCE: depth position l = k*B + b uses shared layer k (1, 1, 2, 2, ...); only the last depth is an exit.
  """

  CYCLE = 'cycle'
  SEQUENCE = 'sequence'


class InitMethod(enum.StrEnum):
  """How the K shared layers are initialised from the L pretrained ones (paper section 2.1)."""

  STEPWISE = 'stepwise'  # Fixed-start: layers 0, B, 2B, ... (the paper's example).
  STEPWISE_ENDS = 'stepwise_ends'  # Fixed-ends: round(linspace(0, L-1, K)), first and last included.
  AVERAGE = 'average'  # Mean of the B layers tied to each shared layer.
  LOWER = 'lower'  # The first K layers.
  UPPER = 'upper'  # The last K layers.
  RANDOM = 'random'  # K layers drawn at random (seeded), kept in depth order.


class NormInit(enum.StrEnum):
  """How shared norm weights are initialised (paper appendix F.1(b)); 'auto' = avg for Average else choice."""

  AUTO = 'auto'
  AVG = 'avg'
  CHOICE = 'choice'
  ZERO = 'zero'  # The norm's identity: w = 0 for Gemma's (1 + w), w = 1 otherwise; biases 0.


class LoraInit(enum.StrEnum):
  SVD = 'svd'  # Truncated SVD of (original - shared) per depth position: exact at full rank.
  # Truncated SVD of the residual whitened by calibration inputs (SVD-LLM): minimises ||X (R - A B)||_F for the
  # projection's calibration inputs X; exact at full rank. Needs calibration statistics (convert/calibration.py).
  WHITENED_SVD = 'whitened_svd'
  ZERO = 'zero'  # Standard LoRA: A random, B zero, so the relaxed model starts as the recursive one.


LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _parse_enum(enum_cls: type[enum.Enum], value, field: str):
  if isinstance(value, enum_cls):
    return value
  try:
    return enum_cls(str(value).lower())
  except ValueError:
    choices = ', '.join(repr(m.value) for m in enum_cls)
    raise ValueError(f'Unknown {field} {value!r}: choose one of {choices}.') from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only LM. One config type covers Gemma, Llama and GPT-NeoX."""

  family: Family | str
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int = 2048
  norm: NormType | str = NormType.RMS
  norm_eps: float = 1e-6
  mlp: MlpType | str = MlpType.SWIGLU
  rope_theta: float = 10_000.0
  rotary_fraction: float = 1.0
  parallel_residual: bool = False
  attn_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = True
  embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(d_model).
  dtype: str = 'float32'  # Compute dtype; params stay in param_dtype, softmax and norms in fp32.
  param_dtype: str = 'float32'
  remat: RematPolicy | str = RematPolicy.NONE

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
    set_('family', _parse_enum(Family, self.family, 'family'))
    set_('norm', _parse_enum(NormType, self.norm, 'norm'))
    set_('mlp', _parse_enum(MlpType, self.mlp, 'mlp'))
    set_('remat', _parse_enum(RematPolicy, self.remat, 'remat policy'))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.')
    rotary_dim = int(self.head_dim * self.rotary_fraction)
    if rotary_dim % 2 or not 0 < rotary_dim <= self.head_dim:
      raise ValueError(
          f'rotary_fraction={self.rotary_fraction} gives {rotary_dim} rotary dims of head_dim '
          f'{self.head_dim}: it must be a positive even number.')

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_fraction)

  @property
  def has_gate(self) -> bool:
    return self.mlp in (MlpType.SWIGLU, MlpType.GEGLU)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class RecursionConfig:
  """How the L-layer model becomes B loops over K = L / B shared layers, and how it is relaxed.

  loops=1 with lora_rank=None is the vanilla model.
  lora_rank: None = plain recursive model; an int > 0 adds one LoRA per (loop, layer) and target,
    its rank capped at min(d_in, d_out) per target.
  lora_alpha: output scale alpha / rank; None means alpha = rank (scale 1). SVD init divides by the scale,
    so the converted model is exact for every alpha.
  relax_vectors: with LoRA, also give each (loop, layer) its own delta on norm scales and biases, so that
    full-rank relaxation reproduces the original model exactly (norms and biases cannot be reached by LoRA).
  """

  loops: int = 1
  looping: Looping | str = Looping.CYCLE
  init: InitMethod | str = InitMethod.STEPWISE
  norm_init: NormInit | str = NormInit.AUTO
  lora_rank: int | None = None
  lora_alpha: float | None = None
  lora_targets: Sequence[str] = LORA_TARGETS
  lora_init: LoraInit | str = LoraInit.SVD
  relax_vectors: bool = True
  seed: int = 0  # For the Random init method and zero-init LoRA's A matrices.

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
    set_('looping', _parse_enum(Looping, self.looping, 'looping'))
    set_('init', _parse_enum(InitMethod, self.init, 'init method'))
    set_('norm_init', _parse_enum(NormInit, self.norm_init, 'norm_init'))
    set_('lora_init', _parse_enum(LoraInit, self.lora_init, 'lora_init'))
    if isinstance(self.lora_targets, str):
      set_('lora_targets', tuple(t.strip() for t in self.lora_targets.split(',') if t.strip()))
    set_('lora_targets', tuple(self.lora_targets))
    if not isinstance(self.loops, int) or self.loops < 1:
      raise ValueError(f'loops must be a positive integer, got {self.loops!r}.')
    if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank <= 0):
      raise ValueError(
          f'lora_rank must be a positive integer, got {self.lora_rank!r}; use lora_rank=None for a '
          'recursive model without LoRA.')
    if self.lora_alpha is not None and self.lora_alpha <= 0:
      raise ValueError(f'lora_alpha must be positive or None (alpha = rank), got {self.lora_alpha!r}.')
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f'Unknown LoRA targets {sorted(unknown)}: choose from {LORA_TARGETS}.')

  @property
  def has_lora(self) -> bool:
    return self.lora_rank is not None

  def shared_layers(self, num_layers: int) -> int:
    """K = L / B, with a clear error when B does not divide L."""
    if num_layers % self.loops:
      divisors = [b for b in range(1, num_layers + 1) if num_layers % b == 0]
      raise ValueError(
          f'loops={self.loops} does not divide num_layers={num_layers}; choose loops from {divisors}.')
    return num_layers // self.loops

  def depth_to_shared(self, depth: int, num_layers: int) -> int:
    """The shared layer used at depth position `depth` (0-indexed) of the unrolled model."""
    k = self.shared_layers(num_layers)
    if not 0 <= depth < num_layers:
      raise ValueError(f'depth {depth} is outside 0..{num_layers - 1}.')
    if self.looping == Looping.CYCLE:
      return depth % k
    return depth // self.loops

  def depth_to_loop(self, depth: int, num_layers: int) -> int:
    """The loop index b of depth position `depth`."""
    k = self.shared_layers(num_layers)
    if self.looping == Looping.CYCLE:
      return depth // k
    return depth % self.loops

  def lora_scale(self, rank: int) -> float:
    """Output scale alpha / r of a LoRA of (capped) rank r."""
    alpha = rank if self.lora_alpha is None else self.lora_alpha
    return alpha / rank

  def replace(self, **changes) -> RecursionConfig:
    return dataclasses.replace(self, **changes)


VANILLA = RecursionConfig()


def lora_rank_for(rec: RecursionConfig, d_in: int, d_out: int) -> int:
  """Rank of one target's LoRA: the configured rank capped at min(d_in, d_out)."""
  assert rec.lora_rank is not None
  return min(rec.lora_rank, d_in, d_out)
