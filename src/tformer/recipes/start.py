"""How a run gets its model: a new one of the spec's sizes, or --init's checkpoint, trained
in full or frozen under LoRA adapters; and, with --merge, the adapters folded in at the end.

    new       GPT2Config from the flags (else nanoGPT's small CPU model, SMALL_MODEL)
    --init    the checkpoint's shape and tokenizer; an adapter checkpoint's updates are
              folded into its weights first, W <- W + (alpha / r) B A
    --lora-*  the weights frozen, rank-r updates added to the --lora-targets layers
"""

from dataclasses import asdict
from pathlib import Path

import torch

from tformer.errors import ConfigError
from tformer.models import adapters
from tformer.models.adapters import lora_targets
from tformer.models.gpt2 import GPT2, GPT2Config
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.nn.lora import LoRAConfig, add_lora, lora_layers, merge_lora, target_layers
from tformer.recipes.spec import TrainSpec

SMALL_MODEL = dict(n_layers=4, n_heads=4, d_model=128)  # sizes no flag or preset gives


def attention_for(choice: str, device: torch.device) -> str:
    """--attention auto: the blocked path for training on a CPU, where it is the fastest
    (docs/LOG.md: PyTorch's fused CPU attention is slow backwards in bf16, and for long
    contexts its path is measured against the FlashAttention kernels, in float32 too);
    else PyTorch's fused kernel."""
    if choice == "auto":
        return "blocked" if device.type == "cpu" else "sdpa"
    return choice


def new_gpt2_config(spec: TrainSpec, vocab_size: int, eos_id: int | None, attention: str):
    """A new GPT-2's config: sizes given in the spec win, the rest come from the preset,
    else SMALL_MODEL."""
    given = dict(n_layers=spec.n_layers, n_heads=spec.n_heads, d_model=spec.d_model)
    given = {k: v for k, v in given.items() if v is not None}
    sizes = given if spec.preset else {**SMALL_MODEL, **given}
    common = dict(
        vocab_size=vocab_size,
        max_len=spec.context,
        d_ff=spec.d_ff,
        dropout=spec.dropout,
        activation=spec.activation,
        norm_position=spec.norm_position,
        attention=attention,
        eos_id=eos_id,
    )
    if spec.preset:
        return GPT2Config.from_preset(spec.preset, **sizes, **common)
    return GPT2Config(**sizes, **common)


def lora_settings(spec: TrainSpec) -> dict | None:
    """The LoRA settings a new run keeps in run.json; None: every weight trains."""
    given = {
        "--lora-alpha": spec.lora_alpha,
        "--lora-dropout": spec.lora_dropout,
        "--lora-targets": spec.lora_targets,
        "--merge": spec.merge or None,
    }
    if spec.lora_rank is None:
        flags = [flag for flag, value in given.items() if value is not None]
        if flags:
            raise ConfigError(f"{', '.join(flags)} go with --lora-rank (LoRA fine-tuning)")
        return None
    if spec.init is None:
        raise ConfigError("LoRA adapts a trained model: give it with --init CHECKPOINT")
    targets = [t.strip() for t in (spec.lora_targets or "c_attn").split(",") if t.strip()]
    lora = LoRAConfig(
        rank=spec.lora_rank,
        alpha=spec.lora_alpha if spec.lora_alpha is not None else 2.0 * spec.lora_rank,
        dropout=spec.lora_dropout or 0.0,
        targets=lora_targets(targets),
    )
    return {**asdict(lora), "targets": list(lora.targets)}


def init_settings(spec: TrainSpec, attention: str) -> dict:
    """What a run started with --init keeps in run.json: the LoRA settings, and the dropout
    and attention path, which a LoRA run's checkpoints (adapters only) cannot hold."""
    lora = lora_settings(spec)  # checked for every new run: LoRA flags need --init
    if spec.init is None:
        return {}
    return {"lora": lora, "merge": spec.merge, "dropout": spec.dropout, "attention": attention}


def saved_settings(saved: dict) -> dict:
    """from_pretrained's dropout and attention for resuming a run (None: the checkpoint's)."""
    return {"dropout": saved.get("dropout"), "attention": saved.get("attention")}


def prepare_init(model: torch.nn.Module, saved: dict, seed: int, say) -> None:
    """The model a run starts from with --init: trained in full (an adapter checkpoint's
    adapters folded in first), or frozen with LoRA layers added (a reader's head trains)."""
    if lora_layers(model):
        if saved["lora"]:
            raise ConfigError(
                f"{saved['init']} holds LoRA adapters; new adapters start from a plain model "
                "(train that run with --merge, and --init from it)"
            )
        merge_lora(model)
        model.requires_grad_(True)
        adapters.body(model).name_or_path = None  # these weights are no checkpoint's
    if not saved["lora"]:
        return
    if not isinstance(model, (GPT2, GPT2ForQuestionAnswering)):
        raise ConfigError("LoRA adapts GPT-2 models (PEFT's layout); train this reader in full")
    lora = LoRAConfig(**saved["lora"])
    check_rank(adapters.body(model), lora)
    names = add_lora(adapters.body(model), lora, seed=seed)
    say(
        f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} on {len(names)} layers "
        f"({', '.join(lora.targets)}); {trainable_parameters(model):,} of "
        f"{model.num_parameters():,} parameters train"
    )


def check_rank(model: torch.nn.Module, lora: LoRAConfig) -> None:
    """Refuse a rank above a layer's smaller side: B A (out x r times r x in) then has
    more numbers than an update of that layer can use, for the cost of a full one."""
    for name in target_layers(model, lora):
        layer = model.get_submodule(name)
        largest = min(layer.in_features, layer.out_features)
        if lora.rank > largest:
            raise ConfigError(
                f"--lora-rank {lora.rank} is larger than the layer it adapts: {name} is "
                f"{layer.out_features} x {layer.in_features}, so the rank can be at most "
                f"{largest}"
            )


def merge_run(model: torch.nn.Module, out: Path, tokenizer) -> None:
    """--merge: the adapters move to RUN_DIR/adapter, and the run directory gets the model
    with their updates folded into its weights. Written in that order, a crash leaves a
    loadable model in the run directory at every moment."""
    model.save_pretrained(out / "adapter")
    tokenizer.save(out / "adapter")
    merge_lora(model)
    adapters.body(model).name_or_path = None
    model.save_pretrained(out)
    for name in (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE):
        (out / name).unlink(missing_ok=True)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
