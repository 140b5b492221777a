"""Load quantship's checkpoints with lmdeploy's own PyTorch engine and measure them there.

The folders are what ``pipeline run recipes/tiny-all-methods.yaml`` writes (the reference, AWQ GEMM, GPTQ,
SmoothQuant W8A8 in lmdeploy's layout). For each, lmdeploy's ``pipeline(..., PytorchEngineConfig())`` loads it,
computes perplexity on the same held-out token windows (``get_ppl``) and answers one greedy chat turn; our
own runtime computes the same perplexity on the same GPU. A wrong layout shows as a load error or as a
perplexity far from ours. Needs a CUDA GPU and lmdeploy (see ../shared/gpu/lmdeploy-carry.sh).

    python bench/lmdeploy_check.py FOLDER_LIST.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def windows(model_dir: Path, n_windows: int = 8, seq_len: int = 256) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = (ROOT / "data" / "eval" / "pydocs-heldout.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_windows)]


def ours_ppl(model_dir: Path, wins: list[list[int]]) -> float:
    import torch

    from pipeline.engines.transformers_engine import load_model

    model, _ = load_model(model_dir, device="cuda", dtype=torch.float16)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w], device="cuda")
            logits = model(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += len(w) - 1
    return math.exp(nll / n)


def lmdeploy_run(model_dir: Path, wins: list[list[int]]) -> dict:
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    pipe = pipeline(str(model_dir), backend_config=PytorchEngineConfig(session_len=1024, cache_max_entry_count=0.05))
    try:
        losses = pipe.get_ppl(wins)  # mean NLL per sequence
        ppl = math.exp(sum(float(x) for x in losses) / len(losses))
        reply = pipe(["How do I sort a list in Python?"], gen_config=GenerationConfig(max_new_tokens=16, do_sample=False))
        return {"lmdeploy_ppl": ppl, "lmdeploy_reply": reply[0].text}
    finally:
        pipe.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", help="JSON: {name: model folder}")
    p.add_argument("--json", default="lmdeploy_check.json")
    args = p.parse_args()
    folders = {k: Path(v) for k, v in json.loads(Path(args.folders).read_text()).items()}
    wins = windows(next(iter(folders.values())))
    rows = []
    for name, folder in folders.items():
        row = {"checkpoint": name}
        for label, fn in (("ours", lambda: {"ours_ppl": ours_ppl(folder, wins)}), ("lmdeploy", lambda: lmdeploy_run(folder, wins))):
            try:
                row.update(fn())
            except Exception as e:
                traceback.print_exc()
                row[f"{label}_error"] = f"{type(e).__name__}: {e}"[:240]
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    print(f"\n{torch.cuda.get_device_name(0)}; lmdeploy PyTorch engine vs quantship runtime, 8 x 256 held-out tokens")
    print("| checkpoint | lmdeploy ppl | quantship ppl | lmdeploy greedy reply |\n|---|---|---|---|")
    for r in rows:
        lm = f"{r['lmdeploy_ppl']:.2f}" if "lmdeploy_ppl" in r else "error: " + r.get("lmdeploy_error", "")[:90]
        us = f"{r['ours_ppl']:.2f}" if "ours_ppl" in r else "error: " + r.get("ours_error", "")[:60]
        print(f"| {r['checkpoint']} | {lm} | {us} | {r.get('lmdeploy_reply', '')[:60]!r} |")
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
