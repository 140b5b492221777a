"""Evaluation: the perplexity protocol, KL/top-1 against a reference, gates and the report.

Exact where the math allows: models whose log-probs are fixed tables give closed-form perplexities and
KL divergences; a tiny random Llama checks the real model interface against transformers' own loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.errors import CalibrationError, StageError
from pipeline.eval.divergence import (
    ReferenceLogprobs,
    compare_to_reference,
    compare_to_reference_logprobs,
    token_kl,
)
from pipeline.eval.gates import check_gates
from pipeline.eval.perplexity import (
    Window,
    join_documents,
    perplexity,
    tokenize_documents,
    window_spans,
)
from pipeline.eval.report import render_report

torch.set_num_threads(1)


# ---- factories (candidates for tests/conftest.py) -------------------------------------------------------


class TableLM(nn.Module):
    """A 'bigram' LM: the next-token log-probs depend only on the current token, read from a [V, V] table."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logprobs.float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def peaked_lm(vocab: int, p: float, shift: int = 1) -> TableLM:
    """After token x, probability p on (x + shift) % vocab and (1 - p) / (vocab - 1) on each other token."""
    table = torch.full((vocab, vocab), (1 - p) / (vocab - 1), dtype=torch.float64)
    table[torch.arange(vocab), (torch.arange(vocab) + shift) % vocab] = p
    return TableLM(table.log())


def counting_stream(n: int, vocab: int) -> torch.Tensor:
    """0, 1, 2, ... mod vocab: the stream a peaked_lm(shift=1) predicts with probability p at every token."""
    return torch.arange(n) % vocab


def tiny_llama(seed: int = 0, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # far from uniform, so KL and top-1 have something to measure
    )
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale: float, seed: int = 1):
    """A copy of ``model`` with Gaussian noise of ``scale`` x each weight's std added: a stand-in 'quantized' model."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std().nan_to_num(0) * scale)
    return other


# ---- windows --------------------------------------------------------------------------------------------


def test_window_spans_exact():
    # 10 tokens, seq_len 4: targets 1..9; the last window keeps 4 tokens of context and scores only token 9.
    assert window_spans(10, 4) == [Window(0, 4, 0), Window(4, 8, 0), Window(5, 9, 3)]
    assert window_spans(9, 4) == [Window(0, 4, 0), Window(4, 8, 0)]
    assert window_spans(3, 4) == [Window(0, 2, 0)]  # a stream shorter than one window: one short window
    assert window_spans(1, 4) == []


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 7])
def test_every_token_after_the_prefix_is_predicted_once(seq_len):
    for n in range(2, 31):
        windows = window_spans(n, seq_len)
        targets = [t for w in windows for t in range(w.start + 1 + w.first_scored, w.end + 1)]
        assert targets == list(range(1, n))
        assert len(windows) == math.ceil((n - 1) / seq_len)
        assert {w.length for w in windows} == {min(seq_len, n - 1)}  # one length: batches need no padding


# ---- perplexity -----------------------------------------------------------------------------------------


def test_uniform_model_has_perplexity_equal_to_vocab():
    vocab = 37
    ids = torch.randint(0, vocab, (50,), generator=torch.Generator().manual_seed(0))
    out = perplexity(TableLM(torch.zeros(vocab, vocab)), ids, seq_len=8, batch_size=3)
    assert out["tokens"] == 49
    assert out["windows"] == 7  # ceil(49 / 8)
    assert out["ppl"] == pytest.approx(vocab, rel=1e-6)
    assert out["nll_mean"] == pytest.approx(math.log(vocab), rel=1e-6)


def test_model_with_probability_p_on_the_right_token_has_perplexity_one_over_p():
    out = perplexity(peaked_lm(11, p=0.6), counting_stream(41, 11), seq_len=6)
    assert out["nll_mean"] == pytest.approx(-math.log(0.6), rel=1e-6)
    assert out["ppl"] == pytest.approx(1 / 0.6, rel=1e-6)
    assert out["tokens"] == 40


@pytest.mark.parametrize("seq_len,batch_size", [(1, 1), (4, 2), (7, 3), (100, 4)])
def test_nll_sum_is_the_sum_over_every_predicted_token(seq_len, batch_size):
    vocab = 13
    g = torch.Generator().manual_seed(1)
    table = torch.log_softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=-1)
    ids = torch.randint(0, vocab, (30,), generator=g)
    expected = -sum(float(table[ids[t - 1], ids[t]]) for t in range(1, 30))
    out = perplexity(TableLM(table), ids, seq_len=seq_len, batch_size=batch_size)
    assert out["nll_sum"] == pytest.approx(expected, rel=1e-6)
    assert out["tokens"] == 29


def test_too_short_text_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="tokenizes to 1 token"):
        perplexity(TableLM(torch.zeros(5, 5)), torch.tensor([3]), seq_len=4)


def test_llama_batched_windows_agree_with_one_by_one():
    model = tiny_llama()
    ids = torch.randint(0, 64, (83,), generator=torch.Generator().manual_seed(2))
    batched = perplexity(model, ids, seq_len=16, batch_size=4)
    single = perplexity(model, ids, seq_len=16, batch_size=1)
    assert batched["tokens"] == single["tokens"] == 82
    assert batched["windows"] == 6
    assert batched["nll_sum"] == pytest.approx(single["nll_sum"], rel=1e-5)


def test_llama_matches_transformers_loss_on_the_protocol_windows():
    model = tiny_llama()
    ids = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(3))

    def loss_sum(x, labels):  # transformers' own shifted mean cross-entropy, times the scored count
        n = int((labels[1:] != -100).sum())
        with torch.no_grad():
            return float(model(input_ids=x[None], labels=labels[None]).loss) * n

    masked_last = ids[5:10].clone()
    masked_last[:4] = -100
    # seq_len 4: ids[0:4] -> 1..4, ids[4:8] -> 5..8, and ids[5:9] (full context) -> 9 only.
    expected = loss_sum(ids[0:5], ids[0:5]) + loss_sum(ids[4:9], ids[4:9]) + loss_sum(ids[5:10], masked_last)
    assert perplexity(model, ids, seq_len=4)["nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_training_mode_is_restored():
    model = tiny_llama().train()
    perplexity(model, torch.arange(20) % 64, seq_len=8)
    assert model.training


def test_tokenize_documents_one_prefix_token_no_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # A tokenizer that adds BOS and EOS around every call: the stream must still have exactly one BOS.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = join_documents(["hello world", "hello"])
    assert text == "hello world\n\nhello"
    ids = tokenize_documents(tok, text)
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 3, 4, 3]

    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert tokenize_documents(no_bos, text).tolist() == [1, 3, 4, 3]  # lm-eval's rule: EOS when there is no BOS


# ---- divergence -----------------------------------------------------------------------------------------


def test_identical_models_have_zero_kl_and_full_agreement():
    model = tiny_llama()
    ids = torch.randint(0, 64, (45,), generator=torch.Generator().manual_seed(4))
    out = compare_to_reference(model, model, ids, seq_len=8, batch_size=2)
    assert out["kl_mean"] == 0.0
    assert out["kl_max"] == 0.0
    assert out["top1_agreement"] == 1.0
    assert out["ppl"] == out["ref_ppl"]
    assert out["ppl_increase_pct"] == 0.0
    assert out["tokens"] == 44
    assert out["ppl"] == pytest.approx(perplexity(model, ids, seq_len=8)["ppl"], rel=1e-6)


def test_kl_between_two_peaked_distributions_is_the_closed_form():
    vocab, p1, p2 = 11, 0.7, 0.4
    ids = counting_stream(30, vocab)
    out = compare_to_reference(peaked_lm(vocab, p1), peaked_lm(vocab, p2), ids, seq_len=7)
    kl = p1 * math.log(p1 / p2) + (1 - p1) * math.log((1 - p1) / (1 - p2))
    assert out["kl_mean"] == pytest.approx(kl, rel=1e-5)
    assert out["kl_max"] == pytest.approx(kl, rel=1e-5)
    assert out["top1_agreement"] == 1.0  # both put their peak on the same token
    assert out["ppl"] == pytest.approx(1 / p2, rel=1e-6)
    assert out["ref_ppl"] == pytest.approx(1 / p1, rel=1e-6)
    assert out["ppl_increase_pct"] == pytest.approx(100 * (p1 / p2 - 1), rel=1e-5)


def test_kl_and_top1_when_the_peaks_differ():
    vocab, p1, p2 = 9, 0.5, 0.8
    r1, r2 = (1 - p1) / (vocab - 1), (1 - p2) / (vocab - 1)
    ref, cand = peaked_lm(vocab, p1, shift=1), peaked_lm(vocab, p2, shift=2)
    out = compare_to_reference(ref, cand, counting_stream(20, vocab), seq_len=4)
    kl = p1 * math.log(p1 / r2) + r1 * math.log(r1 / p2) + (vocab - 2) * r1 * math.log(r1 / r2)
    assert out["kl_mean"] == pytest.approx(kl, rel=1e-5)
    assert out["top1_agreement"] == 0.0
    assert out["ppl"] == pytest.approx(1 / r2, rel=1e-6)


def test_token_kl_is_zero_where_the_reference_has_zero_probability():
    ref = torch.tensor([[0.0, -math.inf]])  # P_ref = (1, 0)
    cand = torch.log(torch.tensor([[0.5, 0.5]]))
    assert token_kl(ref, cand).tolist() == pytest.approx([math.log(2)])
    assert token_kl(cand, ref).tolist() == [math.inf]  # the candidate rules out a token the reference allows


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_reference_gives_the_one_pass_result(tmp_path, on_disk):
    ref, cand = tiny_llama(), perturbed(tiny_llama(), 0.3)
    ids = torch.randint(0, 64, (61,), generator=torch.Generator().manual_seed(5))
    one_pass = compare_to_reference(ref, cand, ids, seq_len=16, batch_size=3)
    assert one_pass["kl_mean"] > 0 and one_pass["top1_agreement"] < 1  # the perturbation is measurable

    folder = tmp_path / "ref" if on_disk else None
    reference = ReferenceLogprobs.compute(ref, ids, seq_len=16, batch_size=3, folder=folder)
    if on_disk:
        reference = ReferenceLogprobs.load(tmp_path / "ref")
        assert sorted(p.name for p in (tmp_path / "ref").iterdir())[:2] == ["ids.safetensors", "reference.json"]
    assert reference.tokens == 60
    assert reference.ppl == pytest.approx(one_pass["ref_ppl"], rel=1e-12)
    cached = compare_to_reference_logprobs(reference, cand, batch_size=3)
    assert cached.keys() == one_pass.keys()
    for key, value in one_pass.items():
        assert cached[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_float16_reference_is_close():
    ref, cand = tiny_llama(), perturbed(tiny_llama(), 0.3)
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(6))
    exact = compare_to_reference(ref, cand, ids, seq_len=16)
    half = compare_to_reference_logprobs(ReferenceLogprobs.compute(ref, ids, 16, dtype=torch.float16), cand)
    assert half["ref_ppl"] == exact["ref_ppl"]  # kept from the float32 pass
    assert half["kl_mean"] == pytest.approx(exact["kl_mean"], rel=1e-2)


def test_incomplete_reference_folder_is_an_error(tmp_path):
    with pytest.raises(StageError, match="missing or incomplete"):
        ReferenceLogprobs.load(tmp_path)


def test_models_with_different_vocabularies_cannot_be_compared():
    ids = counting_stream(12, 5)
    with pytest.raises(StageError, match="gives 5 logits per token and the evaluated model 6"):
        compare_to_reference(peaked_lm(5, 0.5), peaked_lm(6, 0.5), ids, seq_len=4)


# ---- gates ----------------------------------------------------------------------------------------------

METRICS = {"ppl": 10.5, "ref_ppl": 10.0, "kl_mean": 0.0412, "top1_agreement": 0.91}


def test_gates_fail_with_exact_messages():
    gates = {"max_ppl_increase_pct": 2.0, "max_kl": 0.03, "min_top1_agreement": 0.95}
    assert check_gates(METRICS, gates) == [
        "gate max_ppl_increase_pct failed: perplexity increase 5.00% > 2.00% (perplexity 10.5000, reference 10.0000)",
        "gate max_kl failed: KL divergence 0.0412 > 0.0300",
        "gate min_top1_agreement failed: top-1 agreement 0.9100 < 0.9500",
    ]


def test_gates_pass_at_or_within_the_threshold_and_when_unset():
    assert check_gates(METRICS, {"max_ppl_increase_pct": 5.0, "max_kl": 0.0412, "min_top1_agreement": 0.91}) == []
    assert check_gates(METRICS, {"max_ppl_increase_pct": None, "max_kl": None, "min_top1_agreement": None}) == []
    assert check_gates(METRICS, {}) == []


def test_gates_accept_the_recipe_section_object():
    from pydantic import BaseModel

    class Gates(BaseModel):  # the shape of recipe.GatesSection
        max_ppl_increase_pct: float | None = None
        max_kl: float | None = None
        min_top1_agreement: float | None = None

    assert check_gates(METRICS, Gates(max_kl=0.01)) == ["gate max_kl failed: KL divergence 0.0412 > 0.0100"]


def test_gates_fail_on_nan_and_on_missing_metrics():
    assert check_gates({**METRICS, "kl_mean": float("nan")}, {"max_kl": 1.0}) == [
        "gate max_kl failed: KL divergence nan > 1.0000"
    ]
    assert check_gates({"ppl": 10.0}, {"max_kl": 1.0, "max_ppl_increase_pct": 1.0, "min_top1_agreement": 0.5}) == [
        "gate max_ppl_increase_pct failed: the perplexity increase was not measured "
        "(the evaluation has no reference perplexity)",
        "gate max_kl failed: KL divergence was not measured (the evaluation has no reference)",
        "gate min_top1_agreement failed: top-1 agreement was not measured (the evaluation has no reference)",
    ]


def test_unknown_gate_is_a_value_error():
    with pytest.raises(ValueError, match="unknown quality gate\\(s\\) max_kld; the gates are max_ppl_increase_pct"):
        check_gates(METRICS, {"max_kld": 0.1})


# ---- report ---------------------------------------------------------------------------------------------


def test_report_renders_the_table():
    rows = [
        {"variant": "reference", "method": "none", "bits": 16, "size_bytes": 8 * 2**20, "ppl": 10.0, "ref_ppl": 10.0,
         "tokens": 12345, "seq_len": 256, "text_file": "data/eval.txt"},
        {"variant": "rtn", "method": "rtn", "bits": 4, "group_size": 128, "size_bytes": 3 * 2**19, "ppl": 10.5,
         "ref_ppl": 10.0, "kl_mean": 0.0412, "top1_agreement": 0.9123, "tokens": 12345,
         "gate_failures": ["gate max_kl failed: KL divergence 0.0412 > 0.0300"], "seq_len": 256,
         "text_file": "data/eval.txt"},
        {"variant": "awq", "method": "awq", "bits": 4, "group_size": 128, "ppl": 10.01, "ref_ppl": 10.0,
         "kl_mean": 0.00002, "top1_agreement": 0.99, "tokens": 12345, "gate_failures": [], "seq_len": 256,
         "text_file": "data/eval.txt"},
    ]
    md = render_report(rows, "tiny-llama: precision vs quality")
    lines = md.splitlines()
    assert lines[0] == "# tiny-llama: precision vs quality"
    assert lines[2] == (
        "| variant | method | bits/group | size (MiB) | perplexity | Δppl % | KL | top-1 % | eval tokens | gates |"
    )
    assert lines[3] == "|---|---|---|---|---|---|---|---|---|---|"
    assert lines[4] == "| reference | none | 16 | 8.00 | 10.0000 | +0.00 | — | — | 12,345 | — |"
    assert lines[5] == "| rtn | rtn | 4/128 | 1.50 | 10.5000 | +5.00 | 0.0412 | 91.23 | 12,345 | FAIL (1) |"
    assert lines[6] == "| awq | awq | 4/128 | — | 10.0100 | +0.10 | 2.00e-05 | 99.00 | 12,345 | pass |"
    assert "- **rtn**: gate max_kl failed: KL divergence 0.0412 > 0.0300" in lines
    assert "## How measured" in lines
    how = lines[lines.index("## How measured") + 2]
    assert "`data/eval.txt`" in how and "windows of 256 tokens" in how
