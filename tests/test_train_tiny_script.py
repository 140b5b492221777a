"""scripts/train_tiny.py and scripts/make_corpus.py: a 2-step CPU training run on a gzipped corpus slice
gives a folder transformers loads and a log with the device, versions, tokens/s, periodic held-out
perplexity and the corpus's sha256; piecewise encoding gives the whole-text ids; the committed extended
corpus is the training corpus plus reference pages and shares no paragraph with the held-out splits."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_TEXT = ROOT / "data" / "corpus" / "train.txt"
EXTENDED = ROOT / "data" / "corpus" / "train-extended.txt.gz"
EVAL_TEXT = ROOT / "data" / "eval" / "pydocs-heldout.txt"
CALIB_TEXT = ROOT / "calibration" / "pydocs-calib.txt"


def load_script(name: str):
    """A module from scripts/ (not a package), imported by path."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_cpu_steps_on_a_gzipped_corpus(tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = tmp_path / "slice.txt.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write(TRAIN_TEXT.read_text(encoding="utf-8")[:10_000])
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:2_000], encoding="utf-8")
    out = tmp_path / "model"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--corpus", str(corpus), "--heldout", str(heldout),
        "--out", str(out), "--vocab", "300", "--layers", "1", "--hidden", "128", "--intermediate", "256",
        "--heads", "2", "--kv-heads", "1", "--seq-len", "32", "--batch", "2", "--steps", "2", "--eval-every", "1",
        "--threads", "1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]

    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "training_log.json",
    ]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 128
    assert len(tok) == model.config.vocab_size == 300
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 300)

    log = json.loads((out / "training_log.json").read_text())
    assert log["device"] == "cpu" and log["gpu"] is None
    assert log["torch"] == torch.__version__
    assert log["corpus"] == {
        "path": str(corpus), "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(), "characters": 10_000,
    }
    assert log["heldout"]["sha256"] == hashlib.sha256(heldout.read_bytes()).hexdigest()
    assert [e["step"] for e in log["log"]] == [0, 1]
    assert all(e["tokens_per_s"] > 0 and e["heldout_perplexity"] > 1 for e in log["log"])
    assert log["train_tokens_per_s"] > 0
    # The last periodic evaluation and the final one measure the same fp32 model on the same windows.
    assert log["log"][-1]["heldout_perplexity"] == log["heldout_perplexity_fp32"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "tpu"], "--device tpu: not a device; valid: cpu, cuda, cuda:N"),
        (["--device", "meta"], "--device meta: this script trains on cpu or cuda (cuda:N) only"),
        (["--corpus", "/nonexistent/c.txt.gz"],
         "--corpus /nonexistent/c.txt.gz: no such file; give a UTF-8 text file, or a gzipped one ending in .gz"),
        (["--eval-every", "-1"], "--eval-every -1: give a number of steps >= 1, or 0 for only the final perplexity"),
    ],
)
def test_user_mistakes_are_one_line_argparse_errors(argv, message, capsys):
    train_tiny = load_script("train_tiny")
    parser = train_tiny.build_parser()
    with pytest.raises(SystemExit) as exit_:
        train_tiny.check_args(parser, parser.parse_args(argv))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_cuda_without_a_gpu_is_an_argparse_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    train_tiny = load_script("train_tiny")
    parser = train_tiny.build_parser()
    with pytest.raises(SystemExit) as exit_:
        train_tiny.check_args(parser, parser.parse_args(["--device", "cuda"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: --device cuda: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu"
    )


def test_piecewise_encoding_gives_the_ids_of_the_whole_text():
    train_tiny = load_script("train_tiny")
    # Blank lines between words, runs of three newlines, indented code and a blank line at either end.
    text = TRAIN_TEXT.read_text(encoding="utf-8")[:6_000] + "\n\nx\n\n\ny  \n\n  z\n\n\n\n(\n\n)\n\n"
    tok = train_tiny.train_tokenizer(text, 300)
    pieces = train_tiny.split_for_encoding(text, chunk_chars=1)  # a cut at every place it may cut
    assert "".join(pieces) == text and len(pieces) > 20
    piecewise = [i for e in tok.backend_tokenizer.encode_batch(pieces) for i in e.ids]
    assert piecewise == tok(text)["input_ids"]
    assert train_tiny.encode(tok, text).tolist() == tok(text)["input_ids"]


def test_extended_corpus_extends_train_and_keeps_heldout_out():
    raw = EXTENDED.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0: the file is reproducible byte for byte
    extended = gzip.decompress(raw).decode("utf-8")
    train = TRAIN_TEXT.read_text(encoding="utf-8")
    assert extended.startswith(train[:-1] + "\n\n") and len(extended) > 8 * len(train)
    assert "CPython implementation detail:" in extended and "PyList_New" in extended  # library and C-API pages
    # A paragraph inside the extended text has its interior lines as whole lines there: that test is a set
    # lookup, so the slow substring search runs only on the paragraphs that pass it.
    lines = set(extended.splitlines())
    for path in (EVAL_TEXT, CALIB_TEXT):
        paragraphs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
        assert len(paragraphs) > 100
        candidates = [p for p in paragraphs if all(line in lines for line in p.splitlines()[1:-1])]
        assert [p[:60] for p in candidates if p in extended] == []


def test_clean_reference_keeps_api_bodies_and_drops_sphinx_settings():
    make_corpus = load_script("make_corpus")
    rst = (
        ".. module:: spam\n   :synopsis: Spam.\n\n"
        "Spam\n====\n\n"
        ".. function:: eggs(n)\n              eggs(n, m)\n   :noindex:\n\n"
        "   Return *n* :class:`int` eggs.\n\n"
        "   .. versionchanged:: 3.9\n      Added *m*.\n\n"
        "   .. index:: single: eggs\n\n"
        "   More text.\n"
    )
    assert make_corpus.clean_reference(rst) == (
        "Spam\n\neggs(n)\neggs(n, m)\n\n   Return *n* int eggs.\n\n   Changed in version 3.9:\n      Added *m*.\n\n"
        "   More text."
    )
    # The splits' cleaner is unchanged: it drops the whole body of an object description.
    assert make_corpus.clean(rst) == "Spam"
