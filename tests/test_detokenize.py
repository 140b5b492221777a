"""Incremental detokenization (pipeline/serve/detokenize.py) against decoding every id at once, on the shipped
byte-level BPE tokenizer and on a SentencePiece-style one built here (byte fallback, a "▁" prefix that the
decoder strips at the start) and on a BERT-style WordPiece one (spaces between pieces, cleaned up before
punctuation), with text that splits characters across tokens.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.serve.detokenize import IncrementalText
from tests.conftest import TINY_MODEL

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Hello , world . It 's a test ! Isn't it ? (yes) -- ok .",
    "naïve café: 東京タワー 🙂🚀 — ünïcödé ½ × ≠",
    "  leading spaces,  double  spaces and a trailing space ",
    "\n\n\tindent\n",
]


def _corpus() -> list[str]:
    return (TINY_MODEL.parent.parent / "data" / "corpus" / "train.txt").read_text().splitlines()[:2000]


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE with byte fallback, spaces as "▁", a "▁" prepended that decoding drops."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *bytes_], initial_alphabet=["▁"])
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _wordpiece_cleanup() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer: WordPiece, punctuation split off, and decoding that joins pieces with spaces and
    cleans up the space before punctuation (transformers 5 cleans up WordPiece tokenizers only)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module", params=["shipped-bytelevel", "sentencepiece-like", "wordpiece-cleanup"])
def tokenizer(request):
    if request.param == "shipped-bytelevel":
        return AutoTokenizer.from_pretrained(TINY_MODEL)
    return _sentencepiece_like() if request.param == "sentencepiece-like" else _wordpiece_cleanup()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_decoding_all_ids(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = lambda i: tokenizer.decode(i, skip_special_tokens=True)  # noqa: E731
    hold = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    inc = IncrementalText(decode, cleans_up=hold)
    settled = ""
    for n in range(1, len(ids) + 1):
        full = inc.update(ids[:n])
        assert inc.text.startswith(settled), "settled text never changes"
        settled = inc.text
        assert "\ufffd" not in inc.text, "an incomplete character is held back, never settled"
        whole = decode(ids[:n])
        if not whole.endswith("\ufffd"):
            assert full == whole, f"after {n} of {len(ids)} ids"
    assert inc.text + inc.pending == decode(ids)


def test_windows_stay_short_however_long_the_reply():
    """The point of the module: each step decodes a few ids, not the whole reply (O(1) a step, not O(n))."""
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    ids = tok(" ".join(TEXTS) * 40, add_special_tokens=False)["input_ids"][:1500]
    lengths: list[int] = []

    def decode(i):
        lengths.append(len(i))
        return tok.decode(i, skip_special_tokens=True)

    inc = IncrementalText(decode)
    for n in range(1, len(ids) + 1):
        inc.update(ids[:n])
    assert len(ids) == 1500
    assert max(lengths) <= 12, max(lengths)
    assert inc.text + inc.pending == tok.decode(ids, skip_special_tokens=True)


def test_the_scheduler_decodes_short_windows_while_it_streams():
    """Through the server's scheduler: per generated token the tokenizer sees a few ids, and the whole reply
    only once, when it finishes (the reply's text is the same as before: tests/test_serve_batching.py)."""
    from pipeline.serve.batching import SamplingParams
    from pipeline.serve.generate import GenerationEngine
    from tests.conftest import load_tiny

    engine = GenerationEngine(*load_tiny())
    try:
        sched = engine.scheduler
        lengths: list[int] = []
        decode = sched.decode
        sched.decode = lambda ids: lengths.append(len(ids)) or decode(ids)
        sched.eos = set()  # run to max_tokens whatever the tiny model says
        out = engine.run(engine.encode_text("def add(a, b):"), SamplingParams(max_tokens=160, temperature=0.0))
    finally:
        engine.shutdown()
    assert len(out.token_ids) == 160
    long_calls = [n for n in lengths if n > 12]
    assert long_calls == [160], long_calls  # _finish's one decode of the whole reply
    assert out.text == decode(out.token_ids)
