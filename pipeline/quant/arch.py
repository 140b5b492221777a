"""Per-architecture knowledge as data: which norm or linear feeds which linears in a decoder layer.

Keyed by the ``architectures[0]`` string of ``config.json``, so it can be checked before any model is built.
A ``LinearGroup`` lists linears that read the same input; ``prev`` is the module that produces that input,
into which AWQ and SmoothQuant fold their per-input-channel scales (a norm's weight, or a linear's output rows).
Same shape as the layer maps in lmdeploy (``lite/quantization/awq.py``) and AutoAWQ, written as data.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import QuantizationError


@dataclass(frozen=True)
class LinearGroup:
    prev: str  # module (relative to the decoder layer) whose output is the linears' input
    linears: tuple[str, ...]  # linears (relative to the decoder layer) that share that input
    # Fold only when prev's output width equals the linears' input width (v_proj -> o_proj under GQA: no).
    needs_equal_width: bool = False


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # path of the ModuleList of decoder layers
    groups: tuple[LinearGroup, ...]
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a decoder layer, in execution order."""
        return tuple(name for g in self.groups for name in g.linears)


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    groups=(
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("self_attn.v_proj", ("self_attn.o_proj",), needs_equal_width=True),
        LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

# Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms applied after the projections: neither changes which
# module feeds which linears, so all four share one map.
ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
}


def arch_spec(architecture: str | None) -> ArchSpec:
    """The layer map of ``architecture``, or a QuantizationError naming the supported ones."""
    if architecture in ARCHS:
        return ARCHS[architecture]
    raise QuantizationError(
        f"architecture {architecture!r} is not supported for quantization: no layer map says which norms feed "
        f"which linears. Supported: {', '.join(sorted(ARCHS))}. Add an entry to pipeline/quant/arch.py to support it."
    )
