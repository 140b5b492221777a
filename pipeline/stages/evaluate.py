"""evaluate: perplexity of the deployable model, and KL divergence / top-1 agreement against the reference,
on the same tokens of a held-out text (DESIGN.md §6). Gates are judged by the runner from these metrics."""

from __future__ import annotations

from pipeline.artifacts import METRICS, model_path, write_json
from pipeline.stages import StageContext
from pipeline.textdata import join_documents, read_documents


def run(ctx: StageContext) -> dict:
    import torch

    from pipeline.engines.transformers_engine import load_model
    from pipeline.eval.divergence import compare_to_reference
    from pipeline.eval.perplexity import tokenize_documents
    from pipeline.eval.perplexity import model_device
    from pipeline.stages.compile import load_for_eval

    cfg = ctx.config
    # The deployable model through its target's in-process runtime (transformers, ONNX Runtime, llama.cpp, ...):
    # anything ``model(input_ids) -> logits`` (pipeline.eval.perplexity.model_logits); for an engine that does not
    # run here, the quantized checkpoint through the embedded runtime, labelled so in ``runtime``.
    model, tokenizer, runtime = load_for_eval(ctx.inputs["compile"])
    device = model_device(model)
    params = getattr(model, "parameters", None)
    half = next(params()).dtype if params is not None and device.type != "cpu" else torch.float32
    ref_model, _ = load_model(
        model_path(ctx.inputs["download"]), device=str(device), dtype=half,
        allow_pickle=ctx.recipe.variant.model.allow_pickle, trust_remote_code=ctx.recipe.variant.model.trust_remote_code,
    )
    text_path = ctx.recipe.resolve(cfg.text)
    ids = tokenize_documents(tokenizer, join_documents(read_documents(cfg.text, text_path)))
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    ctx.progress(0, 1, f"{ids.numel()} tokens")
    metrics = compare_to_reference(ref_model, model, ids, cfg.seq_len, batch_size=cfg.batch_size)
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    metrics["runtime"] = runtime
    metrics["text"] = str(text_path.name)
    metrics["seq_len"] = cfg.seq_len
    write_json(ctx.out / METRICS, metrics)
    ctx.progress(1, 1, f"ppl {metrics.get('ppl', float('nan')):.2f}")
    return metrics
