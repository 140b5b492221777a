"""The comparison report: one table (Markdown, self-contained HTML, terminal), plots, verdicts; a tiny real run
whose gate one variant fails exits 3 with the verdicts right everywhere and no third-party noise on the terminal."""

from __future__ import annotations

import base64
import re

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.eval.collect import FAILED, PASS, REGRESSION, verdict
from pipeline.eval.plots import quality_vs_size, quality_vs_speed, render_plots
from pipeline.eval.report import render_report, table
from pipeline.eval.report_html import render_html
from tests.conftest import write_recipe

PNG = b"\x89PNG\r\n\x1a\n"
DONE = {k: "done" for k in ("download", "quantize", "compile", "evaluate", "serve")}


def rows():
    return [
        {"variant": "none", "method": "none", "size_bytes": 8 * 2**20, "ref_bytes": 8 * 2**20, "ppl": 10.0,
         "ref_ppl": 10.0, "kl_mean": 0.0, "top1_agreement": 1.0, "tokens": 2047, "quantize_s": 0.01,
         "decode_tps": 30.0, "target": "transformers", "engine_status": "runs here", "runtime": "transformers",
         "tasks": {"pydocs_mc": {"acc": 0.61, "acc_stderr": 0.02}},
         "sanity": {"repetition": 0.05, "eos_rate": 0.9, "reference_overlap": 1.0},
         "gate_failures": [], "verdict": PASS, "verdict_why": "all gates passed"},
        {"variant": "rtn", "method": "rtn", "bits": 4, "group_size": 128, "size_bytes": 2 * 2**20,
         "ref_bytes": 8 * 2**20, "ppl": 10.5, "ref_ppl": 10.0, "kl_mean": 0.0412, "top1_agreement": 0.9123,
         "tokens": 2047, "quantize_s": 5.25, "decode_tps": 47.5, "target": "gguf",
         "engine_status": "not run here: llama-cpp-python is not installed", "runtime": "transformers (same checkpoint)",
         "gate_failures": ["gate max_kl failed: KL divergence 0.0412 > 0.0300"], "verdict": REGRESSION,
         "verdict_why": "1 gate(s) failed"},
        {"variant": "gptq", "method": "gptq", "bits": 4, "group_size": 128, "target": "transformers",
         "verdict": FAILED, "verdict_why": "quantize failed"},
    ]


def test_table_has_every_column_and_dashes_for_what_a_row_lacks():
    headers, cells = table(rows())
    assert headers == ["variant", "verdict", "method", "bits/group", "size (MiB)", "× smaller", "perplexity", "Δppl %", "KL",
                       "top-1 %", "pydocs_mc", "repetition", "EOS rate", "ref overlap", "eval tokens", "quantize s",
                       "decode tok/s*", "target"]
    assert cells[0] == ["none", "pass", "none", "—", "8.00", "1.00×", "10.0000", "+0.00", "0.0000", "100.00", "0.610 ± 0.020",
                        "0.050", "0.90", "1.000", "2,047", "0.0", "30.0", "transformers"]
    assert cells[1] == ["rtn", "regression (1 gate)", "rtn", "4/128", "2.00", "4.00×", "10.5000", "+5.00", "0.0412", "91.23", "—", "—", "—",
                        "—", "2,047", "5.2", "47.5", "gguf (not run here)"]
    assert cells[2][1] == "failed run (quantize failed)" and cells[2][6] == "—"


def test_markdown_lists_failed_gates_failed_runs_plots_and_how_measured():
    md = render_report(rows(), "r", plots=["quality_vs_size.png"])
    assert md.splitlines()[2] == "3 variants: 1 pass, 1 regression, 1 failed run"
    assert "- **rtn**: gate max_kl failed: KL divergence 0.0412 > 0.0300" in md
    assert "## Failed runs\n\n- **gptq**: quantize failed" in md
    assert "![quality_vs_size.png](quality_vs_size.png)" in md
    assert "completion tokens divided by the request's latency" in md and "no publish stage" not in md
    assert ("Publishing: only where the recipe has a `publish` section, and only a variant whose verdict is pass "
            "(its gates and, where the recipe serves, its smoke test passed) goes to `publish.to`; a regression or "
            "a failed run is never published.") in md


def test_html_is_self_contained_with_verdict_badges_and_inline_plots():
    plots = render_plots(rows())
    assert set(plots) == {"quality_vs_size.png", "quality_vs_speed.png"} and all(p.startswith(PNG) for p in plots.values())
    page = render_html(rows(), "r <&>", plots)
    assert "<title>r &lt;&amp;&gt;</title>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 2 and base64.b64decode(imgs[0]).startswith(PNG)
    assert '<span class="badge regression">regression (1 gate)</span>' in page
    assert '<span class="badge pass">pass</span>' in page
    assert '<span class="badge failed">failed run (quantize failed)</span>' in page
    assert "<li><b>rtn</b>: gate max_kl failed: KL divergence 0.0412 &gt; 0.0300</li>" in page


def test_task_scores_in_our_keys_and_lm_evals_raw_keys():
    from pipeline.eval.report import task_score

    assert task_score({"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.6}) == ("acc", 0.5, 0.01)
    assert task_score({"alias": "x", "acc,none": 0.25, "acc_stderr,none": 0.03}) == ("acc,none", 0.25, 0.03)
    assert task_score({"exact_match": 1}) == ("exact_match", 1.0, None)
    assert task_score({"alias": "x"}) is None and task_score(None) is None


def test_sanity_not_measured_shows_dashes_and_text_figures_never_crash():
    rows = [{"variant": "a", "sanity": {"repetition": None, "eos_rate": "n/a", "not_measured": "no decode"}}]
    headers, cells = table(rows)
    at = headers.index("repetition")
    assert cells[0][at:at + 3] == ["—", "n/a", "—"]


def test_plots_need_points():
    assert quality_vs_speed([{"variant": "a", "kl_mean": 0.1}]) is None
    assert quality_vs_size([{"variant": "a", "size_bytes": 2**20, "kl_mean": 0.1}]).startswith(PNG)


@pytest.mark.parametrize("stages,failures,expected", [
    (DONE, [], (PASS, "all gates passed")),
    (DONE, None, (PASS, "no gates set")),
    ({**DONE, "serve": "skipped"}, ["gate max_kl failed"], (REGRESSION, "1 gate(s) failed")),
    ({**DONE, "serve": "failed"}, [], (FAILED, "serve failed")),
    ({**DONE, "compile": "failed", "evaluate": "skipped"}, None, (FAILED, "compile failed")),
    ({**DONE, "evaluate": "missing"}, None, (FAILED, "evaluate did not finish")),
])
def test_verdict(stages, failures, expected):
    assert verdict(stages, failures) == expected


GATED = """\
name: gated
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 128, max_tokens: 1024, gates: {{max_kl: 0.0001}}}}
serve: {{max_tokens: 8}}
matrix:
  quantize.method: [none, rtn]
"""


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gated")
    recipe = write_recipe(tmp, GATED)
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp / "out")], catch_exceptions=False)
    return res, tmp / "out" / "gated"


def test_a_failed_gate_exits_3_and_the_terminal_shows_the_table_without_third_party_noise(gated_run):
    res, _ = gated_run
    assert res.exit_code == 3, res.output
    out = res.output
    assert "Loading weights" not in out and "Token indices sequence length" not in out, out
    assert "gated: variants" in out and "decode tok/s*" in out
    assert re.search(r"│ none\s+│ pass\s+│ none .*│ transformers\s+│", out), out
    assert re.search(r"│ rtn\s+│ regression \(1 gate\)\s+│ rtn .*│ transformers\s+│", out), out
    assert re.search(r"quality gate failed for variant 'rtn': gate max_kl failed: KL divergence 0\.\d+ > 0\.0001", out)
    assert "nothing is published" in out


def test_verdicts_in_report_md_and_html(gated_run):
    _, root = gated_run
    md = (root / "report.md").read_text()
    assert re.search(r"^\| none \| pass \| none \| — \|.*\| transformers \|$", md, re.M), md
    assert re.search(r"^\| rtn \| regression \(1 gate\) \| rtn \| 4/128 \|.*\| transformers \|$", md, re.M), md
    assert re.search(r"- \*\*rtn\*\*: gate max_kl failed: KL divergence 0\.\d+ > 0\.0001", md)
    page = (root / "report.html").read_text()
    assert '<span class="badge pass">pass</span>' in page
    assert '<span class="badge regression">regression (1 gate)</span>' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert (root / "quality_vs_size.png").read_bytes().startswith(PNG)
    # serve is skipped for the regressed variant: no decode speed, and that is not a failed run
    assert "failed run" not in md.split("## How measured")[0]


def test_without_v_transformers_warnings_go_to_run_log_not_the_terminal(tmp_path):
    import logging

    from transformers.utils import logging as hf_logging

    from pipeline.cli import _quiet_third_party, _setup_logging

    def terminal_handlers():  # transformers' own stderr handler (its stream is whatever stderr was at creation)
        return [h for h in logging.getLogger("transformers").handlers if type(h) is logging.StreamHandler]

    hf_logging.get_logger("transformers.test_quiet")  # creates transformers' default handler if not yet there
    before = terminal_handlers()
    assert before
    _setup_logging(0, tmp_path / "run.log")
    hf = hf_logging.get_logger("transformers.test_quiet")
    try:
        with _quiet_third_party(0):
            assert not hf_logging.is_progress_bar_enabled() and terminal_handlers() == []
            hf.warning("quiet-warning-1")
        assert terminal_handlers() == before and hf_logging.is_progress_bar_enabled()
        hf.warning("loud-warning-2")
        with _quiet_third_party(1):  # -v: untouched
            assert terminal_handlers() == before and hf_logging.is_progress_bar_enabled()
    finally:
        for h in list(logging.getLogger("pipeline").handlers):
            h.close()
            logging.getLogger("pipeline").removeHandler(h)
    log = (tmp_path / "run.log").read_text()
    assert "quiet-warning-1" in log and "loud-warning-2" not in log
