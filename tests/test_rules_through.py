"""``eval.through: endpoint`` on a target whose server cannot run here is refused when the recipe is loaded
(pipeline/rules.py), before quantize and compile do any work, naming the field, the target, why and what is valid."""

from __future__ import annotations

import pytest

from pipeline.errors import RecipeError
from pipeline.recipe_load import load_recipe
from tests.conftest import write_recipe

RECIPE = """\
name: th
model: {{source: {model}}}
quantize: {{method: METHOD}}
compile: {{target: TARGET, device: DEVICE}}
eval:
  text: {eval}
  through: THROUGH
"""


def _serving_here(*targets: str) -> str:
    """The targets among ``targets`` that run here on the CPU (gguf: where llama-cpp-python is installed)."""
    from pipeline.targets import engine_module

    return ", ".join(t for t in targets if engine_module(t).available("cpu").runs)


def _recipe(tmp_path, target: str, through: str = "endpoint", method: str = "none", device: str = "cpu"):
    text = RECIPE.replace("TARGET", target).replace("THROUGH", through).replace("METHOD", method)
    text = text.replace("DEVICE", device)
    if method == "rtn":
        text = text.replace("quantize: {{method: rtn}}", "quantize: {{method: rtn, w_bits: 4, w_group_size: 128}}")
    return write_recipe(tmp_path, text)


def test_a_target_without_a_server_is_refused_at_load(tmp_path):
    path = _recipe(tmp_path, "onnxruntime")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}:7: field 'eval.through': endpoint, but compile.target 'onnxruntime' has no server that runs on this "
        "machine (not served: ONNX Runtime and onnxruntime-genai ship no OpenAI-compatible server), so the evaluate "
        "stage could not start one; valid: eval.through auto (the endpoint where the target's server runs, else in "
        "process, labelled so) or in_process, or a compile.target whose server runs here for this format "
        f"({_serving_here('transformers', 'gguf')}), or run the recipe on a machine that runs ONNX Runtime.")


def test_auto_and_in_process_load_and_a_serving_target_loads(tmp_path):
    for through in ("auto", "in_process"):
        assert load_recipe(_recipe(tmp_path, "onnxruntime", through)).variants
    assert load_recipe(_recipe(tmp_path, "transformers")).variants  # the embedded server runs wherever torch does


def test_an_engine_that_does_not_run_here_is_refused_before_any_stage(tmp_path):
    """vLLM needs CUDA (and vllm): `pipeline run` stops at the recipe, with nothing quantized or compiled."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.engines import vllm_engine

    why = vllm_engine.available("cuda")
    if why.runs:
        pytest.skip("vLLM runs on this machine")
    path = _recipe(tmp_path, "vllm", method="rtn", device="auto")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert (f"{path}:7: field 'eval.through': endpoint, but compile.target 'vllm' has no server that runs on this "
            f"machine (not run here on cuda: {why.why}), so the evaluate stage could not start one; valid: "
            "eval.through auto") in str(err.value)
    assert str(err.value).endswith(f"for this format ({_serving_here('transformers', 'gguf')}), or run the recipe "
                                   "on a machine that runs vLLM.")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(out)])
    assert res.exit_code != 0 and "field 'eval.through': endpoint" in res.output
    assert not list(out.glob("th/quantize-*")) and not list(out.glob("th/compile-*"))
