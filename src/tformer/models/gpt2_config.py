"""GPT-2's configuration: sizes, regularisation, and the switches the experiments vary."""

from dataclasses import asdict, dataclass, fields, replace

from tformer.nn.attention import IMPLEMENTATIONS, Implementation
from tformer.nn.feedforward import ACTIVATIONS, Activation
from tformer.nn.sublayer import NORM_POSITIONS, NormPosition

# name -> (n_layers, n_heads, d_model), as published.
PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
END_OF_TEXT = 50256  # <|endoftext|> in GPT-2's vocabulary


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    max_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.1  # on each sublayer's output, before it joins the residual stream
    attention_dropout: float | None = None  # on the attention weights; None: same as dropout
    embedding_dropout: float | None = None  # on token + position embeddings; None: same
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    eos_id: int | None = None  # the end-of-text token, where generation stops
    activation: Activation = "gelu_tanh"  # GPT-2's; "gelu" (exact) is nanoGPT's and faster on CPU
    norm_position: NormPosition = "pre"
    residual: bool = True
    attention: Implementation = "sdpa"
    init: str = "gpt2"  # "gpt2", or "xavier": the original Transformer's (see GPT2.init_weights)

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.embedding_dropout is None:
            self.embedding_dropout = self.dropout
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive number, got {value!r}")
        for name in ("dropout", "attention_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"GPT2Config.{name} must be a number, got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {value}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPT2Config: d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"GPT2Config.norm_position must be one of {', '.join(NORM_POSITIONS)}, "
                f"got {self.norm_position!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.init not in ("gpt2", "xavier"):
            raise ValueError(f"GPT2Config.init must be 'gpt2' or 'xavier', got {self.init!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(
                f"GPT2Config.attention must be one of {', '.join(IMPLEMENTATIONS)}, "
                f"got {self.attention!r}"
            )
        if self.eos_id is not None and (
            not isinstance(self.eos_id, int) or not 0 <= self.eos_id < self.vocab_size
        ):
            raise ValueError(
                f"GPT2Config.eos_id {self.eos_id} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        """A published size by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layers, n_heads, d_model = PRESETS[name]
        preset = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, eos_id=END_OF_TEXT)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPT2Config field(s): {', '.join(sorted(unknown))}")
        return cls(**{**preset, **overrides})

    def with_settings(
        self, dropout: float | None = None, attention: Implementation | None = None
    ) -> "GPT2Config":
        """This config with every dropout and the attention path replaced where given:
        settings that change how a model trains or runs, not its weights."""
        config = self
        if dropout is not None:
            config = replace(
                config, dropout=dropout, attention_dropout=dropout, embedding_dropout=dropout
            )
        if attention is not None:
            config = replace(config, attention=attention)
        return config

    def to_dict(self) -> dict:
        return asdict(self)
