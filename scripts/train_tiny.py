"""Train the tiny real Llama model that recipes and tests use, reproducibly from a seed.

The corpus is ``data/corpus/train.txt`` (Python documentation, PSF License; see ``data/README.md``), or
any ``--corpus`` file, gzipped (``.gz``) or not, e.g. ``data/corpus/train-extended.txt.gz``.
The script trains a byte-level BPE tokenizer with a ChatML chat template, then a small
``LlamaForCausalLM`` whose widths suit 4-bit packing and group size 128 (every linear's input width is
a multiple of 128, every output width a multiple of 8), and writes a Hugging Face model folder
(safetensors, fp16) with ``training_log.json``: the loss curve (with tokens/s, and held-out perplexity
every ``--eval-every`` steps), the final held-out perplexity, the unigram baseline on the same tokens,
the device, torch version and the corpus's sha256.

    python scripts/train_tiny.py --out models/tiny-llama-pydocs            # the shipped fixture (CPU)
    python scripts/train_tiny.py --layers 8 --hidden 384 --out /tmp/bigger  # a larger config
    python scripts/train_tiny.py --device cuda --corpus data/corpus/train-extended.txt.gz \\
        --batch 64 --steps 500 --eval-every 50 --out /tmp/tiny-ext          # on a GPU, bf16 autocast

On ``--device cuda`` the weights and optimizer stay fp32 and only the forward/backward run under bf16
autocast; the model is initialised and the batches are drawn on the CPU from the same seed, so every
device sees the same initial weights and the same token stream.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|end_of_text|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def read_text(path: str) -> str:
    """A UTF-8 text file, gunzipped when its name ends in ``.gz``."""
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(path).read_text(encoding="utf-8")


def sha256(path: str) -> str:
    """Of the file's bytes as stored (the gzip itself for ``.gz``; make_corpus writes it deterministically)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_for_encoding(text: str, chunk_chars: int = 1 << 16) -> list[str]:
    """Cut ``text`` into ~chunk_chars pieces that encode, concatenated, to exactly the ids of the whole.

    The byte-level pre-tokenizer (GPT-2's regex) splits a blank line between two words, "x\\n\\ny", into
    "x", "\\n", "\\n", "y"; cutting between the two newlines gives "x\\n" + "\\ny", whose pre-tokens are the
    same, and BPE never merges across pre-tokens. So the cut goes there, and only where the whitespace run
    is exactly two newlines. Encoding the pieces as a batch runs on every core instead of one.
    """
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + chunk_chars)
        while cut != -1 and not (
            cut > 0 and not text[cut - 1].isspace() and cut + 2 < len(text) and not text[cut + 2].isspace()
        ):
            cut = text.find("\n\n", cut + 1)
        if cut == -1:
            pieces.append(text[start:])
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    return pieces


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """The ids ``tokenizer(text)`` gives, computed piecewise in parallel (see ``split_for_encoding``)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(split_for_encoding(text))
    return torch.tensor([i for e in encodings for i in e.ids], dtype=torch.long)


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    """Non-overlapping windows, mean NLL over every predicted token."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, seq_len):
        window = ids[start : start + seq_len + 1]
        if window.numel() < 2:
            break
        window = window.to(model.device)
        logits = model(window[None, :-1]).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(nll / count)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_ids[1:]].mean().item())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "models" / "tiny-llama-pydocs"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus" / "train.txt"), help="text, or gzip if .gz")
    p.add_argument("--heldout", default=str(ROOT / "data" / "eval" / "pydocs-heldout.txt"))
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (bf16 autocast, fp32 weights)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (0: only at the end)")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    check_args(p, args)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    text = read_text(args.corpus)
    tokenizer = train_tokenizer(text, args.vocab)
    train_ids = encode(tokenizer, text)
    eval_ids = encode(tokenizer, read_text(args.heldout))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(device)  # initialised on the CPU from the seed, then moved
    # bf16 autocast on the GPU (weights, grads and AdamW state stay fp32); the CPU run stays plain fp32.
    autocast = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)  # a CPU generator: the same batches on every device
    offsets = torch.arange(args.seq_len + 1)
    log: list[dict] = []
    t0 = time.time()
    mark, mark_step = time.perf_counter(), -1  # tokens/s since the previous log entry, evaluation time left out
    eval_seconds = 0.0
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        # Row i is train_ids[starts[i] : starts[i] + seq_len + 1], gathered on the CPU.
        batch = train_ids[starts[:, None] + offsets].to(device)
        with autocast():
            loss = model(batch[:, :-1], labels=batch[:, :-1].clone()).loss  # HF shifts labels internally
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        last = step == args.steps - 1
        evaluate = args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or last)
        if step % 25 == 0 or last or evaluate:
            entry = {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0, 1)}
            now = time.perf_counter()  # loss.item() waited for the GPU, so the steps so far are done
            entry["tokens_per_s"] = round((step - mark_step) * args.batch * args.seq_len / (now - mark))
            if evaluate:  # after this step's update; eval has no dropout or RNG, so training is unchanged
                model.eval()
                entry["heldout_perplexity"] = round(perplexity(model, eval_ids, args.seq_len), 3)
                model.train()
                eval_seconds += time.perf_counter() - now
            log.append(entry)
            print(entry, flush=True)
            mark, mark_step = time.perf_counter(), step
    train_seconds = time.time() - t0 - eval_seconds
    model.eval()
    ppl = perplexity(model, eval_ids, args.seq_len)  # fp32, outside autocast, on every device
    uni = unigram_perplexity(train_ids, eval_ids, len(tokenizer))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    summary = {
        "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": train_ids.numel(),
        "heldout_tokens": eval_ids.numel(),
        "heldout_perplexity_fp32": round(ppl, 3),
        "unigram_perplexity": round(uni, 3),
        "train_seconds": round(time.time() - t0, 1),
        "train_tokens_per_s": round(args.steps * args.batch * args.seq_len / train_seconds),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "corpus": {"path": args.corpus, "sha256": sha256(args.corpus), "characters": len(text)},
        "heldout": {"path": args.heldout, "sha256": sha256(args.heldout)},
        "log": log,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=1))


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """User mistakes become one-paragraph argparse errors (exit code 2), not tracebacks."""
    for name in ("corpus", "heldout"):
        if not Path(getattr(args, name)).is_file():
            p.error(f"--{name} {getattr(args, name)}: no such file; give a UTF-8 text file, or a gzipped one "
                    "ending in .gz")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device; valid: cpu, cuda, cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: this script trains on cpu or cuda (cuda:N) only")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if args.eval_every < 0:
        p.error(f"--eval-every {args.eval_every}: give a number of steps >= 1, or 0 for only the final perplexity")
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be at least 1")


if __name__ == "__main__":
    main()
