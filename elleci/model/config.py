"""`ElleciConfig`: one flat dataclass that fixes every dimension of an Elleci model.

The layer stack is a pattern string tiled over `n_layers`: `M` is a Mamba-2 mixer, `A` an MLA
mixer. Layer `i` has type `layer_pattern[i % len(layer_pattern)]`, so the released V1 is `"MA"`
(Mamba on even layers) and the original HEAD default ("V2") is `"MMMA"` (MLA where i % 4 == 3).

Presets (`ElleciConfig.from_name`):

| name        | d_model | layers | pattern | gates | params        | use                          |
|-------------|---------|--------|---------|-------|---------------|------------------------------|
| `tiny`      | 64      | 4      | MA      | no    | 354,384       | unit tests                   |
| `small`     | 256     | 8      | MMMA    | yes   | 9,736,528     | CPU examples and benchmarks  |
| `elleci-v1` | 2048    | 24     | MA      | no    | 1,377,245,376 | the released V1 checkpoint   |
| `elleci-v2` | 2048    | 24     | MMMA    | yes   | 1,476,434,376 | the original HEAD default    |

"gates" = the V2 Mamba input gate (`mamba_input_gate`) and MLA latent gate (`mla_latent_gate`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._io import read_json_file


@dataclass
class ElleciConfig:
    vocab_size: int = 32128            # 32,043 tokenizer ids padded to a multiple of 128
    d_model: int = 2048
    n_layers: int = 24
    layer_pattern: str = "MA"          # tiled over n_layers; M = Mamba-2, A = MLA
    # MLA (multi-head latent attention)
    n_heads: int = 16                  # head_dim = d_model / n_heads, RoPE over the full head
    kv_lora_rank: int = 128            # r: width of the cached latent c = W_down x
    rope_base: float = 100_000.0
    mla_latent_gate: bool = False      # V2 ("EG-MLA"): c <- c * sigmoid(W_g x)
    # Mamba-2 (SSD with per-channel dt and one shared B/C group)
    mamba_heads: int = 8               # Hm; head dim P = d_inner / Hm
    d_state: int = 16                  # N
    d_conv: int = 4
    expand: int = 2                    # d_inner = expand * d_model
    chunk_size: int = 16               # chunk length of the parallel scan (computational only; see mamba2.py)
    mamba_input_gate: bool = False     # V2 ("Differential"): x <- x * (1 + 0.5 sigmoid(W_g (u_t - u_{t-1})))
    # FFN (SwiGLU of BitLinear)
    ffn_hidden: int | None = None      # None: 256 * ceil(int(8 d / 3) / 256)
    # numerics and training
    norm_eps: float = 1e-6             # block RMSNorms (BitLinear's internal norm uses 1e-5)
    dropout: float = 0.0               # residual dropout (the original trained with 0.1)
    init_std: float = 0.02
    gradient_checkpointing: bool = False
    autocast: bool = True              # bf16 autocast in forward when the input is on CUDA

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def mamba_head_dim(self) -> int:
        return self.d_inner // self.mamba_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 256 * math.ceil(int(self.d_model * 8 / 3) / 256)

    @property
    def layer_types(self) -> list[str]:
        """Mixer type of every layer, e.g. ['M', 'A', 'M', 'A'] for pattern 'MA' and 4 layers."""
        p = self.layer_pattern
        return [p[i % len(p)] for i in range(self.n_layers)]

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"ElleciConfig: {msg}")

        def number(v) -> bool:          # a real number: int or float, never a bool or a string
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank", "mamba_heads",
                     "d_state", "d_conv", "expand", "chunk_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        for name in ("mla_latent_gate", "mamba_input_gate", "gradient_checkpointing", "autocast"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
        for name in ("norm_eps", "rope_base", "init_std"):
            v = getattr(self, name)
            need(number(v) and math.isfinite(v) and v > 0, f"{name} must be a finite positive number, got {v!r}")
        need(isinstance(self.layer_pattern, str) and len(self.layer_pattern) > 0
             and set(self.layer_pattern) <= {"M", "A"},
             f"layer_pattern must be a non-empty string of 'M' (Mamba) and 'A' (MLA), got {self.layer_pattern!r}")
        need(self.d_model % self.n_heads == 0,
             f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        need(self.head_dim % 2 == 0,
             f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE (rotate-half)")
        need(self.d_inner % self.mamba_heads == 0,
             f"mamba_heads={self.mamba_heads} does not divide d_inner = expand * d_model = {self.d_inner}")
        v = self.ffn_hidden
        need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
             f"ffn_hidden must be a positive int or null, got {v!r}")
        need(number(self.dropout) and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")

    # ---- presets and serialisation -------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ElleciConfig":
        """A preset by name (`tiny`, `small`, `elleci-v1`, `elleci-v2`), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ElleciConfig field(s): {sorted(unknown)}")
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ElleciConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "ElleciConfig":
        """Read a config.json; every error (syntax, unknown field, bad value) names the file."""
        d = read_json_file(path, "config JSON")
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of ElleciConfig fields, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


_V1 = dict(vocab_size=32128, d_model=2048, n_layers=24, layer_pattern="MA", n_heads=16, kv_lora_rank=128,
           mamba_heads=8, d_state=16, d_conv=4, expand=2, chunk_size=16)

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=4, layer_pattern="MA", n_heads=4, kv_lora_rank=32,
                 mamba_heads=4, d_state=16, d_conv=4, expand=2, chunk_size=16),
    "small": dict(vocab_size=4096, d_model=256, n_layers=8, layer_pattern="MMMA", n_heads=4, kv_lora_rank=64,
                  mamba_heads=4, d_state=16, d_conv=4, expand=2, chunk_size=16,
                  mamba_input_gate=True, mla_latent_gate=True),
    "elleci-v1": dict(_V1),
    "elleci-v2": dict(_V1, layer_pattern="MMMA", mamba_input_gate=True, mla_latent_gate=True),
}
