"""Task accuracy through lm-eval on the shipped pydocs_cloze task (local data, no download): the request
semantics of our LM wrapper are exact, the tiny trained model scores well above chance and an untrained one
does not, and unknown tasks / generation on a bare logits callable fail with clear errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from pipeline.errors import RecipeError, StageError  # noqa: E402
from pipeline.eval.tasks import SHIPPED_TASKS, make_lm, run_tasks, score_continuations  # noqa: E402
from tests.conftest import TINY_MODEL, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from pipeline.engines.transformers_engine import load_model

    return load_model(TINY_MODEL, device="cpu", dtype=torch.float32)


def _req(*args):
    return SimpleNamespace(args=args)


def test_shipped_task_data():
    rows = [json.loads(line) for line in (SHIPPED_TASKS / "pydocs_cloze.jsonl").read_text().splitlines()]
    assert len(rows) == 165
    for r in rows:
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        words = sorted(r["choices"][r["label"]].split())
        assert all(sorted(c.split()) == words for c in r["choices"])  # distractors: the same words, reordered


def test_loglikelihood_is_the_sum_of_continuation_logprobs(tiny):
    model, tok = tiny
    lm = make_lm(model, tok, max_length=64)
    context, continuation = "Python is a programming", " language that lets you"
    (ll, greedy), = lm.loglikelihood([_req(context + " ", continuation.lstrip())])  # trailing space moves over
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    assert whole[: len(ctx)] == ctx
    seq = [tok.bos_token_id] + whole
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([seq[:-1]])).logits[0].float(), -1)
    n = len(whole) - len(ctx)
    targets = torch.tensor(seq[-n:])
    expect = lp[-n:].gather(-1, targets[:, None]).sum()
    assert ll == pytest.approx(float(expect), abs=1e-4)
    assert greedy == bool((lp[-n:].argmax(-1) == targets).all())
    # batching and right padding change nothing: a pair alone == the same pair among longer ones
    pairs = [([0, 5, 6], [7, 8]), ([0] + list(range(10, 40)), [41]), ([0, 9], [10, 11, 12])]
    together = score_continuations(model, pairs, 64, batch_size=3)
    for pair, got in zip(pairs, together):
        (alone,) = score_continuations(model, [pair], 64)
        assert got[0] == pytest.approx(alone[0], abs=1e-4) and got[1] == alone[1]


def test_loglikelihood_rolling_matches_a_direct_sum(tiny):
    model, tok = tiny
    text = "The sort() method sorts a list in place. The sorted() function builds a new sorted list."
    (got,) = make_lm(model, tok, max_length=512).loglikelihood_rolling([_req(text)])
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), -1)
    assert got == pytest.approx(float(lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum()), abs=1e-3)
    # windows of 8 tokens (less context per token) score the text lower than one window
    (short,) = make_lm(model, tok, max_length=8).loglikelihood_rolling([_req(text)])
    assert short < got


def test_generate_until_needs_a_transformers_model(tiny):
    model, tok = tiny
    bare = make_lm(lambda x: model(input_ids=x).logits, tok)
    with pytest.raises(StageError, match="only on transformers models"):
        bare.generate_until([_req("Python is", {"until": ["\n"], "max_gen_toks": 4})])
    (text,) = make_lm(model, tok).generate_until([_req("Python is", {"until": ["\n"], "max_gen_toks": 6})])
    assert isinstance(text, str) and "\n" not in text


def test_unknown_task_is_a_recipe_error(tiny):
    model, tok = tiny
    with pytest.raises(RecipeError, match="no_such_task_xyz"):
        run_tasks(model, tok, ["no_such_task_xyz"])


@pytest.mark.slow
def test_tiny_model_beats_chance_and_an_untrained_one_does_not(tiny, tmp_path):
    """60 items: acc's stderr is at most sqrt(0.25/60) = 0.065. The trained model must clear chance by 4 of its
    own stderrs (measured: 0.80 +- 0.045 on 80 items, 0.82 on all 165); an untrained model of the same shape and
    tokenizer must stay within 3 chance stderrs (sqrt(0.25*0.75/60) = 0.056) of 1/4."""
    model, tok = tiny
    res = run_tasks(model, tok, ["pydocs_cloze"], limit=60)["pydocs_cloze"]
    assert res["n"] == 60 and res["chance"] == 0.25
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(res)
    assert res["acc_stderr"] == pytest.approx((res["acc"] * (1 - res["acc"]) / 59) ** 0.5, abs=1e-4)
    assert res["acc"] > res["chance"] + 4 * res["acc_stderr"], res

    from pipeline.engines.transformers_engine import load_model

    random_model, _ = load_model(make_tiny_llama(tmp_path / "untrained", layers=4), device="cpu", dtype=torch.float32)
    bad = run_tasks(random_model, tok, ["pydocs_cloze"], limit=60)["pydocs_cloze"]
    assert abs(bad["acc"] - 0.25) <= 3 * (0.25 * 0.75 / 60) ** 0.5, bad
    assert bad["acc"] < res["acc"] - 0.3
