"""GPT-2's configuration: sizes, regularisation, and the switches the experiments vary."""

import numbers
from dataclasses import asdict, dataclass, fields, replace

from tformer.checks import check_choice, check_number, number_problem
from tformer.errors import ConfigError
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
# The initialisations (GPT2.init_weights; tformer.nn.init has the original Transformer's):
INITS = {
    "gpt2": "N(0, 0.02) everywhere, the residual-stream projections / sqrt(2 n_layers)",
    "vaswani": "the original Transformer's: Xavier-uniform, W^Q/W^K/W^V with the stacked "
    "(3C, C) matrix's bound, embeddings N(0, 1/C) scaled by sqrt(C)",
    "xavier": "Xavier-uniform with W^Q/W^K/W^V each its own C x C matrix, embeddings "
    "N(0, 1/C) unscaled (tformer's lab before it had 'vaswani')",
}
POSITIONS = ("learned", "sinusoidal")


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
    init: str = "gpt2"  # "gpt2", "vaswani" (the original Transformer's) or "xavier" (see INITS)
    scale_embeddings: bool | None = None  # token vectors x sqrt(d_model); None: with "vaswani"
    positions: str = "learned"  # "learned" (GPT-2's) or "sinusoidal" (the original Transformer's)

    def __post_init__(self) -> None:
        if self.d_ff is None and is_count(self.d_model):
            self.d_ff = 4 * self.d_model
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.embedding_dropout is None:
            self.embedding_dropout = self.dropout
        if self.scale_embeddings is None:
            self.scale_embeddings = self.init == "vaswani"
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff"):
            if not is_count(getattr(self, name)):
                raise ConfigError(
                    f"GPT2Config.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        for name in ("layer_norm_eps", "init_std"):
            if number_problem(getattr(self, name), low=0.0, low_open=True) is not None:
                raise ConfigError(
                    f"GPT2Config.{name} must be a positive number, got {getattr(self, name)!r}"
                )
        for name in ("dropout", "attention_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ConfigError(f"GPT2Config.{name} must be a number, got {value!r}")
            check_number(f"GPT2Config.{name}", value, low=0.0, high=1.0, high_open=True)
        for name in ("residual", "scale_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"GPT2Config.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"GPT2Config: d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        check_choice("GPT2Config.norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("GPT2Config.activation", self.activation, ACTIVATIONS)
        check_choice("GPT2Config.init", self.init, tuple(INITS))
        check_choice("GPT2Config.positions", self.positions, POSITIONS)
        check_choice("GPT2Config.attention", self.attention, IMPLEMENTATIONS)
        eos = self.eos_id
        if eos is not None and (not isinstance(eos, numbers.Integral) or isinstance(eos, bool)):
            raise ConfigError(f"GPT2Config.eos_id must be a token id, got {eos!r}")
        if eos is not None and not 0 <= eos < self.vocab_size:
            raise ConfigError(
                f"GPT2Config.eos_id {self.eos_id!r} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        """A published size by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        if name not in PRESETS:
            raise ConfigError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layers, n_heads, d_model = PRESETS[name]
        preset = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, eos_id=END_OF_TEXT)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown GPT2Config field(s): {', '.join(sorted(unknown))}")
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


def is_count(value) -> bool:
    """A positive integer, Python's or numpy's (True and 1.0 are not: a size is counted, not
    switched or measured)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0
