"""Configs as data: the architecture of a decoder LM and how it is made recursive.

Both are frozen dataclasses, hashable, so they can be static arguments of jitted functions.
Validation happens in `__post_init__` so a bad value fails where it is written, with the fix named.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence


class Family(enum.StrEnum):
  """The decoder families one ModelConfig covers (they differ in norms, MLP, rotary and residual layout)."""

  GEMMA = 'gemma'
  LLAMA = 'llama'
  GPT_NEOX = 'gpt_neox'
  QWEN2 = 'qwen2'  # Llama + bias on q, k, v (Qwen2 and Qwen2.5).
  QWEN3 = 'qwen3'  # Llama + per-head q/k RMSNorm.
  MISTRAL = 'mistral'  # Llama + sliding-window attention.
  GEMMA2 = 'gemma2'  # Gemma + sandwich norms, soft-capping, query_pre_attn_scalar, local/global layers.
  GEMMA3 = 'gemma3'  # Gemma 2 + per-head q/k norm and a RoPE base of its own for local layers (no soft-capping).
  OLMO2 = 'olmo2'  # Llama with post-norms only and q/k RMSNorm over the whole projection.
  PHI3 = 'phi3'  # Llama with fused qkv and gate_up projections in its checkpoints (split on load).


class NormType(enum.StrEnum):
  RMS = 'rms'
  RMS_ONE_PLUS = 'rms_one_plus'  # Gemma's RMSNorm with scale (1 + w).
  LAYER = 'layer'


class NormPlacement(enum.StrEnum):
  """Where a layer's norms sit around its two branches f (attention, MLP)."""

  PRE = 'pre'  # h + f(norm(h)): Llama, Gemma, GPT-NeoX and most others.
  SANDWICH = 'sandwich'  # h + post_norm(f(norm(h))): Gemma 2 and 3.
  POST = 'post'  # h + post_norm(f(h)): OLMo 2.


class QKNorm(enum.StrEnum):
  """RMSNorm of queries and keys before RoPE."""

  NONE = 'none'
  HEAD = 'head'  # Over each head's head_dim, one weight shared by the heads: Qwen3, Gemma 3.
  PROJECTION = 'projection'  # Over the whole q (heads * head_dim) and k projection: OLMo 2.


FULL, SLIDING = 'full', 'sliding'  # Attention types of `ModelConfig.layer_types`.


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


class LayerLayout(enum.StrEnum):
  """How a stack's per-layer variables are laid out (`rrt_jax.model.variables.with_layer_layout` converts).

  STACKED: one array per variable with a leading layer axis, run by nn.scan (training, checkpoints, export).
  PER_LAYER: one buffer per layer (keys '0', '1', ... under the stack's layer path), run by a Python loop over the
  layers: serving on CPU, where the scan's dynamic slice of each layer's weights out of the stacked array is a
  copy XLA:CPU makes before every matmul (a read, a write and a second read of every weight byte per token).
  LoRA keeps its leading loop axis in both. SEQUENCE looping has no per-layer form. With
  ModelConfig.fuse_projections (the default) the per-layer layout also holds the projections of one input side
  by side (q/k/v, gate/up: one kernel each), so a token runs 4 matmuls per layer instead of 7.
  """

  STACKED = 'stacked'
  PER_LAYER = 'per_layer'


class AttentionImpl(enum.StrEnum):
  """How attention runs without a KV cache (training, scoring, prefill); decoding with a cache always uses EINSUM.

  AUTO resolves at trace time by jax.default_backend() (`rrt_jax.model.attention.resolve_attention`): CUDNN on GPU
  in bf16/fp16 (cuDNN flash attention needs half precision), XLA on GPU otherwise, SPLASH on TPU, EINSUM elsewhere.
  """

  AUTO = 'auto'
  EINSUM = 'einsum'  # rrt_jax's own einsum + fp32 softmax (the reference).
  XLA = 'xla'  # jax.nn.dot_product_attention(implementation='xla').
  CUDNN = 'cudnn'  # jax.nn.dot_product_attention(implementation='cudnn'): GPU, bf16/fp16 only.
  SPLASH = 'splash'  # The Pallas splash attention kernel: TPU only.


class Looping(enum.StrEnum):
  """How the B loops visit the K shared layers (Takase & Kiyono, 2021).

  CYCLE: depth position l = b*K + k uses shared layer k (1..K, 1..K, ...); each loop ends in a complete
    hidden state, so every loop can be an exit. The paper's pattern.
  SEQUENCE: depth position l = k*B + b uses shared layer k (1, 1, 2, 2, ...); only the last depth is an exit.
  MIDDLE_CYCLE: Mixture-of-Recursions' Middle-Cycle (Bae et al., 2025, arXiv 2507.10524, Table 12): the first and
    last `unique_layers` (u) layers keep their own weights (the prelude and the coda); the L - 2u middle
    positions loop CYCLE-wise over K = (L - 2u) / B shared layers, depth u + b*K + k using shared layer k.
    Every loop is an exit, through the coda and the head. unique_layers=0 is CYCLE.
  """

  CYCLE = 'cycle'
  SEQUENCE = 'sequence'
  MIDDLE_CYCLE = 'middle_cycle'


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


ROPE_SCALING_TYPES = ('linear', 'llama3', 'yarn')  # Beside none ('default' in HF configs).


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling of long-context checkpoints, as HF transformers computes it (modeling_rope_utils).

  linear: every inverse frequency divided by `factor` (position interpolation).
  llama3: Llama 3.1's: wavelengths above original_max_position_embeddings / low_freq_factor divided by `factor`,
    below original_max_position_embeddings / high_freq_factor kept, smoothly interpolated in between.
  yarn: YaRN (Qwen3's long context): frequencies below beta_slow rotations over original_max_position_embeddings
    divided by `factor`, above beta_fast kept, a linear ramp between (over dimensions, bounds floored/ceiled unless
    truncate=False); cos and sin multiplied by attention_factor (default 0.1 ln(factor) + 1).
  """

  rope_type: str
  factor: float
  low_freq_factor: float | None = None  # llama3 only, like the two below.
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  # yarn only, like the three below; None: transformers' defaults (32, 1, from factor, True).
  beta_fast: float | None = None
  beta_slow: float | None = None
  attention_factor: float | None = None
  truncate: bool | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(f'RoPE scaling type {self.rope_type!r} is not supported: rrt_jax implements '
                       f'{", ".join(ROPE_SCALING_TYPES)} (and none).')
    if not self.factor > 0:
      raise ValueError(f'RoPE scaling factor must be positive, got {self.factor!r}.')
    if self.rope_type == 'llama3':
      llama3 = ('low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
      missing = [k for k in llama3 if getattr(self, k) is None]
      if missing:
        raise ValueError(f'llama3 RoPE scaling needs {", ".join(missing)}.')
      if not 0 < self.low_freq_factor < self.high_freq_factor:
        raise ValueError(f'llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor, got '
                         f'{self.low_freq_factor} and {self.high_freq_factor}.')
    if self.rope_type == 'yarn' and not self.original_max_position_embeddings:
      raise ValueError('yarn RoPE scaling needs original_max_position_embeddings.')

  @property
  def cos_sin_scale(self) -> float:
    """The factor on RoPE's cos and sin (YaRN's attention factor; 1 for the other types)."""
    if self.rope_type != 'yarn':
      return 1.0
    if self.attention_factor is not None:
      return self.attention_factor
    return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# MIDDLE_CYCLE's two stacks of unique layers (before and after the loops), as `RecursionConfig.unique_part` names them.
PRELUDE, CODA = 'prelude', 'coda'


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
  rope_scaling: RopeScaling | None = None  # None: plain RoPE. A dict (JSON) is read as RopeScaling's fields.
  rotary_fraction: float = 1.0
  parallel_residual: bool = False
  attn_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = True
  embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(d_model).
  dtype: str = 'float32'  # Compute dtype; params stay in param_dtype, softmax and norms in fp32.
  param_dtype: str = 'float32'
  remat: RematPolicy | str = RematPolicy.NONE
  attention: AttentionImpl | str = AttentionImpl.AUTO  # See AttentionImpl; checkpoints without it read 'auto'.
  # Unroll the scans over layers and loops (a Python-level loop in the compiled program): faster steps and compiles
  # for small models (few depth positions, tiny matmuls, where while-loop overhead dominates); same values.
  scan_unroll: bool = False
  layer_layout: LayerLayout | str = LayerLayout.STACKED  # See LayerLayout; serving converts, checkpoints stay stacked.
  fuse_projections: bool = True  # PER_LAYER runs q/k/v and gate/up as one matmul each (see LayerLayout).
  # The features of the newer families; every default keeps the families above as they were.
  qkv_bias: bool = False  # Bias on q, k and v but not o (Qwen2); attn_bias puts one on all four.
  qk_norm: QKNorm | str = QKNorm.NONE
  norm_placement: NormPlacement | str = NormPlacement.PRE
  query_pre_attn_scalar: float | None = None  # Attention logits scaled by its -1/2 power; None: head_dim's.
  attn_softcap: float | None = None  # Attention logits -> cap * tanh(logits / cap) (Gemma 2).
  final_softcap: float | None = None  # The same on the LM head's logits.
  sliding_window: int | None = None  # A sliding layer's query at p sees keys at p - window < q <= p.
  # Per layer 'full' or 'sliding'; None: every layer sliding when sliding_window is set (Mistral), else full.
  layer_types: tuple[str, ...] | None = None
  local_rope_theta: float | None = None  # Sliding layers' RoPE base, unscaled (Gemma 3); None: the full layers'.

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
    set_('family', _parse_enum(Family, self.family, 'family'))
    set_('norm', _parse_enum(NormType, self.norm, 'norm'))
    set_('mlp', _parse_enum(MlpType, self.mlp, 'mlp'))
    set_('remat', _parse_enum(RematPolicy, self.remat, 'remat policy'))
    set_('attention', _parse_enum(AttentionImpl, self.attention, 'attention implementation'))
    set_('layer_layout', _parse_enum(LayerLayout, self.layer_layout, 'layer_layout'))
    set_('qk_norm', _parse_enum(QKNorm, self.qk_norm, 'qk_norm'))
    set_('norm_placement', _parse_enum(NormPlacement, self.norm_placement, 'norm_placement'))
    self._check_layer_types()
    if self.parallel_residual and self.norm_placement != NormPlacement.PRE:
      raise ValueError(f'parallel_residual needs norm_placement=\'pre\', got {self.norm_placement.value!r}.')
    if isinstance(self.rope_scaling, dict):
      known = {f.name for f in dataclasses.fields(RopeScaling)}
      if unknown := sorted(set(self.rope_scaling) - known):
        raise ValueError(f'Unknown rope_scaling field(s) {", ".join(unknown)}: RopeScaling has {sorted(known)}.')
      set_('rope_scaling', RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.')
    rotary_dim = int(self.head_dim * self.rotary_fraction)
    if rotary_dim % 2 or not 0 < rotary_dim <= self.head_dim:
      raise ValueError(
          f'rotary_fraction={self.rotary_fraction} gives {rotary_dim} rotary dims of head_dim '
          f'{self.head_dim}: it must be a positive even number.')

  def _check_layer_types(self):
    if self.layer_types is None:
      return
    object.__setattr__(self, 'layer_types', tuple(self.layer_types))
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f'layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}: give '
                       'one per layer.')
    if bad := sorted(set(self.layer_types) - {FULL, SLIDING}):
      raise ValueError(f'Unknown layer type(s) {bad}: choose {FULL!r} or {SLIDING!r} per layer.')
    if SLIDING in self.layer_types and not self.sliding_window:
      raise ValueError("layer_types has 'sliding' layers but sliding_window is not set.")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_fraction)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it attends through the sliding window."""
    if self.layer_types is None:
      return (bool(self.sliding_window),) * self.num_layers
    return tuple(t == SLIDING for t in self.layer_types)

  @property
  def uniform_sliding(self) -> bool | None:
    """Whether every layer slides (True) or none does (False); None when the layers mix both types."""
    kinds = set(self.sliding_layers)
    return kinds.pop() if len(kinds) == 1 else None

  def layer_config(self, depth: int) -> ModelConfig:
    """This config with every layer of depth position `depth`'s attention type: what one layer run on its own
    (conversion, healing) computes there."""
    if self.uniform_sliding is not None:
      return self
    return self.replace(layer_types=(self.layer_types[depth],) * self.num_layers)

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
  unique_layers: under looping='middle_cycle', how many first and last layers keep their own weights (u each);
    they are exact copies of the original layers and get no LoRA. 0 elsewhere.
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
  unique_layers: int = 0
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
    if not isinstance(self.unique_layers, int) or self.unique_layers < 0:
      raise ValueError(f'unique_layers must be a non-negative integer, got {self.unique_layers!r}.')
    if self.unique_layers and self.looping != Looping.MIDDLE_CYCLE:
      raise ValueError(
          f'unique_layers={self.unique_layers} needs looping=\'middle_cycle\' (got {self.looping.value!r}): set '
          "looping='middle_cycle', or unique_layers=0.")
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

  @property
  def loops_are_exits(self) -> bool:
    """Whether every loop ends in a complete hidden state, hence is an exit (CYCLE and MIDDLE_CYCLE)."""
    return self.looping in (Looping.CYCLE, Looping.MIDDLE_CYCLE)

  @property
  def num_exits(self) -> int:
    """E: exits of the model (R when every loop is an exit, else 1)."""
    return self.loops if self.loops_are_exits else 1

  def shared_layers(self, num_layers: int) -> int:
    """K = (L - 2u) / B (u = unique_layers, 0 unless MIDDLE_CYCLE), with a clear error when it is not a
    positive integer."""
    u = self.unique_layers
    middle = num_layers - 2 * u
    if middle >= 1 and middle % self.loops == 0:
      return middle // self.loops
    if not u:
      divisors = [b for b in range(1, num_layers + 1) if num_layers % b == 0]
      raise ValueError(
          f'loops={self.loops} does not divide num_layers={num_layers}; choose loops from {divisors}.')
    valid = [v for v in range((num_layers + 1) // 2) if (num_layers - 2 * v) % self.loops == 0]
    if middle < 1:
      why = f'leaves no middle layers to loop (num_layers={num_layers} - 2 * {u} = {middle});'
    else:
      loops = [b for b in range(1, middle + 1) if middle % b == 0]
      why = (f'leaves {middle} middle layers (num_layers={num_layers} - 2 * {u}), which loops={self.loops} does '
             f'not divide: choose loops from {loops}, or')
    raise ValueError(f'unique_layers={u} {why} with loops={self.loops} choose unique_layers from {valid or "none"} '
                     '(2 * unique_layers < num_layers and loops dividing the rest).')

  def unique_part(self, depth: int, num_layers: int) -> tuple[str, int] | None:
    """For a unique depth position of MIDDLE_CYCLE, ('prelude', i) or ('coda', i): its stack and index there;
    None for a looped depth position (every depth under CYCLE and SEQUENCE)."""
    self.shared_layers(num_layers)
    if not 0 <= depth < num_layers:
      raise ValueError(f'depth {depth} is outside 0..{num_layers - 1}.')
    u = self.unique_layers
    if depth < u:
      return PRELUDE, depth
    if depth >= num_layers - u:
      return CODA, depth - (num_layers - u)
    return None

  def is_unique_depth(self, depth: int, num_layers: int) -> bool:
    """Whether depth position `depth` is one of MIDDLE_CYCLE's unique layers (own weights, no shared layer,
    no LoRA)."""
    return self.unique_part(depth, num_layers) is not None

  def _looped_depth(self, depth: int, num_layers: int) -> int:
    """`depth` counted from the first looped position; a unique depth raises."""
    part = self.unique_part(depth, num_layers)
    if part is not None:
      raise ValueError(f'depth {depth} is a unique {part[0]} layer under looping=\'middle_cycle\' (unique_layers='
                       f'{self.unique_layers}): it has no shared layer nor loop; check is_unique_depth first.')
    return depth - self.unique_layers

  def depth_to_shared(self, depth: int, num_layers: int) -> int:
    """The shared layer used at depth position `depth` (0-indexed) of the unrolled model. Raises for a unique
    depth of MIDDLE_CYCLE (see `is_unique_depth`)."""
    k = self.shared_layers(num_layers)
    if not 0 <= depth < num_layers:
      raise ValueError(f'depth {depth} is outside 0..{num_layers - 1}.')
    if self.looping == Looping.CYCLE:
      return depth % k
    if self.looping == Looping.MIDDLE_CYCLE:
      return self._looped_depth(depth, num_layers) % k
    return depth // self.loops

  def depth_to_loop(self, depth: int, num_layers: int) -> int:
    """The loop index b of depth position `depth`. Raises for a unique depth of MIDDLE_CYCLE."""
    k = self.shared_layers(num_layers)
    if self.looping == Looping.CYCLE:
      return depth // k
    if self.looping == Looping.MIDDLE_CYCLE:
      return self._looped_depth(depth, num_layers) // k
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


def _pattern_fits(sliding: tuple[bool, ...], rec: RecursionConfig) -> bool:
  """Whether every shared layer of `rec` is tied only to depth positions of one attention type."""
  num_layers = len(sliding)
  try:
    rec.shared_layers(num_layers)
  except ValueError:
    return False
  seen: dict[int, bool] = {}
  for depth, kind in enumerate(sliding):
    if not rec.is_unique_depth(depth, num_layers):
      if seen.setdefault(rec.depth_to_shared(depth, num_layers), kind) != kind:
        return False
  return True


def check_layer_pattern(cfg: ModelConfig, rec: RecursionConfig) -> None:
  """A shared layer keeps one attention type (its window and RoPE base are part of what it computes): a looping
  that ties a local layer to a global one is refused, naming the loop counts (and middle-cycle settings) that fit."""
  sliding = cfg.sliding_layers
  if cfg.uniform_sliding is not None or _pattern_fits(sliding, rec):
    return
  n = cfg.num_layers
  fits = {looping: [b for b in range(1, n + 1)
                    if _pattern_fits(sliding, rec.replace(looping=looping, unique_layers=0, loops=b))]
          for looping in (Looping.CYCLE, Looping.SEQUENCE)}
  middle = [f'loops={b}, unique_layers={u}' for u in range(1, (n + 1) // 2) for b in range(2, n)
            if _pattern_fits(sliding, rec.replace(looping=Looping.MIDDLE_CYCLE, unique_layers=u, loops=b))][:6]
  pattern = ''.join('L' if s else 'G' for s in sliding)
  options = '; '.join(f'looping={k.value!r} with loops in {v}' for k, v in fits.items())
  raise ValueError(
      f'loops={rec.loops} ({rec.looping.value}, unique_layers={rec.unique_layers}) ties local (sliding-window) and '
      f'global layers to one shared layer (layer pattern {pattern}, L = local, G = global): a shared layer must keep '
      f'one attention type. What fits: {options}'
      + (f"; looping='middle_cycle' with {'; or '.join(middle)}" if middle else '') + '.')


def layer_kinds(cfg: ModelConfig, rec: RecursionConfig) -> dict[str, tuple[bool, ...]] | None:
  """Whether each layer slides, by stack: {'stack': [K] per shared layer, 'prelude': [U], 'coda': [U]}; None when
  every layer has the same type (then it is static, read from cfg). Checks the pattern first."""
  if cfg.uniform_sliding is not None:
    return None
  check_layer_pattern(cfg, rec)
  n, u, sliding = cfg.num_layers, rec.unique_layers, cfg.sliding_layers
  stack = {rec.depth_to_shared(d, n): sliding[d] for d in range(n) if not rec.is_unique_depth(d, n)}
  return {'stack': tuple(stack[k] for k in range(rec.shared_layers(n))), PRELUDE: sliding[:u],
          CODA: sliding[n - u:]}
