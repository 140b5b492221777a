"""calibrate: deterministic token windows from a text source, shared by every variant that needs them."""

from __future__ import annotations

import time

from pipeline.artifacts import CALIB_TOKENS, model_path
from pipeline.errors import CalibrationError
from pipeline.stages import StageContext
from pipeline.textdata import join_documents, read_documents


def run(ctx: StageContext) -> dict:
    entered = time.perf_counter()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    cfg = ctx.config
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path(ctx.inputs["download"]), trust_remote_code=ctx.recipe.variant.model.trust_remote_code)
    docs = read_documents(cfg.source, ctx.recipe.resolve(cfg.source), cfg.text_field, cfg.split, cfg.subset)
    # verbose=False: the stream is cut into windows below, so the tokenizer's maximum-length warning does not apply.
    ids = torch.tensor(tokenizer(join_documents(docs), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    ctx.log.info("%s: imports %.1f s, tokenizer and %d tokens %.1f s", ctx.run_id, started - entered,
                 ids.numel(), time.perf_counter() - started)
    tokens = sample_windows(ids, cfg.samples, cfg.seq_len, cfg.seed)
    save_file({"input_ids": tokens.contiguous()}, str(ctx.out / CALIB_TOKENS))
    ctx.progress(1, 1, f"{cfg.samples} x {cfg.seq_len} tokens")
    return {"samples": cfg.samples, "seq_len": cfg.seq_len, "tokens_available": int(ids.numel()), "documents": len(docs)}


def sample_windows(ids, samples: int, seq_len: int, seed: int):
    """``samples`` windows of ``seq_len`` tokens at seeded random starts (overlapping only if the text is short)."""
    import torch

    if ids.numel() < seq_len:
        raise CalibrationError(
            f"the calibration text has {ids.numel()} tokens, fewer than calibration.seq_len {seq_len}; "
            "use a longer text or a smaller seq_len."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
