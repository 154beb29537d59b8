"""The model-family interface: what the engine, `LLM` and the loaders need from an architecture.

A family is one module of pure functions (config -> params layout -> forward). The engine calls only
`forward` (tokens [B, T] at positions, against the cache), `lm_logits` and `init_cache`, so a second
architecture is a new module registered here, not edits across the engine. The loaders call the rest: the
family reads its own HF and GGUF configs (refusing, by name, whatever it does not implement), maps HF tensor
names onto its params, and says how llama.cpp's GGUF files name and change those tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxgen.errors import ModelLoadError

from . import gemma, gguf_loader, layers, llama, lora, moe, phi3, qwen3
from .config import ModelConfig


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: each family is one registered object
class Family:
    """One architecture's pure functions; hashable, so jitted programs take it as a static argument."""

    name: str
    architectures: tuple[str, ...]  # the HF `model_type` values (`ModelConfig.architecture`) it runs
    forward: Callable  # (params, cfg, cache, tokens [B,T], positions [B,T], kv_len, rows, lora, adapters, *, span,
    #                     hidden, row_blocks) -> (hidden, cache)
    lm_logits: Callable  # (params, cfg, hidden [..., D]) -> float32 logits [..., V]
    init_cache: Callable  # (cfg, num_slots, max_len, dtype) -> cache
    init_params: Callable  # (cfg, key, dtype) -> params
    config_from_hf: Callable  # (HF config.json dict) -> ModelConfig
    layer_from_hf: Callable  # (cfg, get(hf_name) -> array, layer index) -> {param name: array}
    gguf_architectures: tuple[tuple[str, str], ...] = ()  # (GGUF general.architecture, our architecture)
    config_from_gguf: Callable | None = None  # (reader, GGUF arch, our architecture) -> ModelConfig
    gguf_tensors: tuple[tuple[str, str], ...] = ()  # GGUF -> HF names beyond (or replacing) the Llama table
    gguf_fix: Callable | None = None  # (hf_name, array) -> array: undo what llama.cpp's converter changed
    fields: type | None = None  # the dataclass in `ModelConfig.extra` (with `from_dict`), None if none
    lora_targets: tuple[str, ...] = lora.TARGETS  # the HF module names a LoRA adapter may target
    gguf_experts: bool = False  # its GGUF files have experts (llama.cpp stores Mixtral as `llama` with experts)
    shard_specs: tuple[tuple[str, object], ...] = ()  # (param name, PartitionSpec) beyond sharding.PARAM_SPECS
    splits_layers: Callable = lambda cfg: True  # (cfg) -> whether forward runs layer spans (`llama.forward`)
    gguf_blocks: bool = False  # its projections are HF's q/k/v/o/gate/up/down as they are (`projections_from_hf`),
    #                            so a GGUF file's blocks of them serve decode steps (`gguf_loader.projection_blocks`)


LLAMA = Family("llama", ("llama", "mistral", "qwen2"), llama.forward, llama.lm_logits, layers.init_cache,
               llama.init_params, llama.config_from_hf, llama.layer_from_hf,
               gguf_architectures=(("llama", "llama"), ("qwen2", "qwen2")),
               config_from_gguf=gguf_loader.llama_config_from_gguf, gguf_blocks=True)
QWEN3 = Family("qwen3", ("qwen3",), llama.forward, llama.lm_logits, layers.init_cache, qwen3.init_params,
               qwen3.config_from_hf, qwen3.layer_from_hf, gguf_architectures=(("qwen3", "qwen3"),),
               config_from_gguf=gguf_loader.llama_config_from_gguf, gguf_tensors=qwen3.GGUF_TENSORS, gguf_blocks=True)
GEMMA = Family("gemma", gemma.ARCHITECTURES, gemma.forward, gemma.lm_logits, layers.init_cache, gemma.init_params,
               gemma.config_from_hf, gemma.layer_from_hf,
               gguf_architectures=(("gemma2", "gemma2"), ("gemma3", "gemma3_text")),
               config_from_gguf=gemma.config_from_gguf, gguf_tensors=gemma.GGUF_TENSORS, gguf_fix=gemma.gguf_fix,
               fields=gemma.GemmaFields, gguf_blocks=True)
PHI3 = Family("phi3", ("phi3",), phi3.forward, llama.lm_logits, phi3.init_cache, llama.init_params,
              phi3.config_from_hf, phi3.layer_from_hf, gguf_architectures=(("phi3", "phi3"),),
              config_from_gguf=phi3.config_from_gguf, gguf_tensors=phi3.GGUF_TENSORS, fields=phi3.Phi3Fields,
              lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), splits_layers=phi3.splits_layers)
MIXTRAL, QWEN3_MOE = (
    Family(name, (arch,), moe.forward, llama.lm_logits, layers.init_cache, moe.init_params, moe.config_from_hf,
           moe.layer_from_hf, gguf_architectures=((gguf_arch, arch),), config_from_gguf=moe.config_from_gguf,
           gguf_tensors=moe.GGUF_TENSORS[arch], fields=moe.MoeFields, lora_targets=lora.ATTENTION_TARGETS,
           gguf_experts=True, shard_specs=moe.SHARD_SPECS)
    for name, arch, gguf_arch in (("mixtral", "mixtral", "llama"), ("qwen3_moe", "qwen3_moe", "qwen3moe")))
FAMILIES = (LLAMA, QWEN3, GEMMA, PHI3, MIXTRAL, QWEN3_MOE)


def supported() -> str:
    """The architectures some family runs, for error messages."""
    return ", ".join(a for f in FAMILIES for a in f.architectures)


def family_for_architecture(architecture: str) -> Family:
    """The family that runs `architecture` (an HF model_type), or a ModelLoadError naming it."""
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    raise ModelLoadError(f"unsupported architecture {architecture!r}; supported: {supported()}")


def family_for(cfg: ModelConfig) -> Family:
    """The family that runs `cfg`'s architecture, or a ModelLoadError naming it."""
    return family_for_architecture(cfg.architecture)


def family_for_gguf(arch: str, experts: bool = False) -> tuple[Family, str]:
    """(family, our architecture) for a GGUF `general.architecture` (whose file has `experts` or not), or a
    ModelLoadError naming it."""
    for family in FAMILIES:
        for gguf_arch, architecture in family.gguf_architectures:
            if gguf_arch == arch and family.gguf_experts == experts:
                return family, architecture
    names = ", ".join(a for f in FAMILIES for a, _ in f.gguf_architectures)
    raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {names}")
