"""The recipe: schema, line-numbered errors, ${ENV} interpolation, matrix expansion, cross-stage rules."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe_load import load_recipe
from tests.conftest import ROOT, write_recipe

BASE = """\
model:
  source: {model}
quantize:
  method: rtn
"""


def test_minimal_recipe_fills_defaults(tmp_path):
    r = load_recipe(write_recipe(tmp_path, BASE))
    assert r.name == "recipe"
    assert list(r.variants) == ["rtn"]
    q = r.variants["rtn"].quantize
    assert (q.w_bits, q.w_group_size, q.w_sym) == (4, 128, False)
    assert r.base.model.trust_remote_code is False and r.base.model.allow_pickle is False


def test_unknown_key_names_file_line_field_and_valid_keys(tmp_path):
    path = write_recipe(tmp_path, BASE + "  w_bitz: 4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == (
        f"{path.resolve()}:5: field 'quantize.w_bitz': unknown key; valid keys here: awq, device, fp8, gptq, method, smoothquant, w_bits, w_group_size, w_sym."
    )


def test_wrong_type_and_bad_choice(tmp_path):
    path = write_recipe(tmp_path, BASE.replace("rtn", "magic") + "  w_group_size: big\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"{path.resolve()}:4: field 'quantize.method': input should be 'none', 'rtn', 'awq', 'gptq', 'smoothquant', 'fp8', 'bnb-nf4' or 'bnb-int8' (got 'magic')" in msg
    assert f"{path.resolve()}:5: field 'quantize.w_group_size': Input should be a valid integer" in msg


def test_yaml_syntax_error_has_line(tmp_path):
    path = write_recipe(tmp_path, BASE + "  w_bits: [4\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_env_interpolation_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("QS_TEST_GROUP", "64")
    text = BASE + "  w_group_size: ${{QS_TEST_GROUP}}\nserve:\n  api_key: ${{QS_TEST_KEY:-sekrit}}\n"
    r = load_recipe(write_recipe(tmp_path, text))
    assert r.base.quantize.w_group_size == 64
    assert r.base.serve.api_key.get_secret_value() == "sekrit"
    assert "sekrit" not in repr(r.base.serve)


def test_env_missing_names_variable_and_line(tmp_path, monkeypatch):
    monkeypatch.delenv("QS_NOT_SET", raising=False)
    path = write_recipe(tmp_path, BASE + "  w_group_size: ${{QS_NOT_SET}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path.resolve()}:5: field 'quantize.w_group_size' uses ${{QS_NOT_SET}}, which is not set")


def test_matrix_expands_variants(tmp_path):
    text = BASE + "matrix:\n  quantize.method: [none, rtn]\n  quantize.w_group_size: [64, 128]\n"
    r = load_recipe(write_recipe(tmp_path, text))
    assert list(r.variants) == ["none-groupsize64", "none-groupsize128", "rtn-groupsize64", "rtn-groupsize128"]
    assert r.variants["rtn-groupsize64"].quantize.w_group_size == 64


def test_matrix_unknown_field(tmp_path):
    path = write_recipe(tmp_path, BASE + "matrix:\n  quantize.colour: [red]\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:6: field 'matrix.quantize.colour': not a recipe field"):
        load_recipe(path)


def test_target_that_cannot_load_the_format(tmp_path):
    path = write_recipe(tmp_path, BASE + "  w_group_size: 64\ncompile:\n  target: turbomind\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == (
        f"{path.resolve()}:7: field 'compile.target': lmdeploy TurboMind loads awq only with group size 128, not 64 "
        "(lmdeploy 0.18 turbomind/converter.py get_tm_config: group size 128); targets that load it: "
        "transformers, onnxruntime, gguf, lmdeploy-pytorch, vllm, sglang."
    )


def test_rtn_is_four_bit_only(tmp_path):
    path = write_recipe(tmp_path, BASE + "  w_bits: 3\n")
    with pytest.raises(RecipeError, match="rtn writes the AWQ GEMM layout, which holds 4-bit weights only; valid: 4; got 3"):
        load_recipe(path)


@pytest.mark.parametrize("quantize, message", [
    ("{method: smoothquant, w_bits: 4}", "field 'quantize.w_bits': smoothquant is W8A8: 8-bit weights; valid: 8; got 4"),
    ("{method: gptq, w_bits: 3}", "field 'quantize.w_bits': gptq writes; valid: 4 or 8; got 3"),
    ("{method: smoothquant, smoothquant: {alpha: 1.5}}", "field 'quantize.smoothquant.alpha': Input should be less than 1"),
    ("{method: gptq, gptq: {damp: 0}}", "field 'quantize.gptq.damp': Input should be greater than 0"),
    ("{method: awq}", "field 'quantize.method': awq needs calibration data; add a 'calibration:' section"),
])
def test_bad_method_settings_fail_validation(tmp_path, quantize, message):
    path = write_recipe(tmp_path, "model: {{source: {model}}}\nquantize: " + quantize.replace("{", "{{").replace("}", "}}") + "\n"
                        "calibration: {{source: {calib}}}\n" * ("awq" not in quantize or "sym" in quantize))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert message in str(e.value)


def test_method_defaults_are_filled(tmp_path):
    text = "model: {{source: {model}}}\ncalibration: {{source: {calib}}}\nquantize: {{method: gptq}}\n" \
           "matrix: {{quantize.method: [gptq, smoothquant, awq]}}\n"
    r = load_recipe(write_recipe(tmp_path, text))
    assert (r.variants["gptq"].quantize.w_bits, r.variants["gptq"].quantize.w_sym) == (4, True)
    assert (r.variants["smoothquant"].quantize.w_bits, r.variants["smoothquant"].quantize.w_sym) == (8, False)
    assert r.variants["awq"].quantize.awq.n_grid == 20


GPTQ_TURBOMIND = ("model: {{source: {model}}}\ncalibration: {{source: {calib}}}\n"
                  "quantize: {{method: gptq{gptq}}}\ncompile: {{target: turbomind}}\n")


def test_turbomind_rejects_permuted_act_order_gptq(tmp_path):
    path = write_recipe(tmp_path, GPTQ_TURBOMIND.replace("{gptq}", ", gptq: {{desc_act: true, static_groups: false}}"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == (
        f"{path.resolve()}:4: field 'compile.target': lmdeploy TurboMind does not read g_idx, so it cannot load "
        "act-order with a permuted g_idx (desc_act: true needs static_groups: true) (lmdeploy 0.18 "
        "turbomind/converter.py: desc_act false, sym, group size 128); targets that load it: transformers, "
        "vllm, sglang."
    )


@pytest.mark.parametrize("gptq", ["", ", gptq: {{desc_act: true, static_groups: true}}", ", gptq: {{desc_act: false}}"])
def test_turbomind_takes_static_act_order_gptq(tmp_path, gptq):
    # The default (static act-order) and plain column order meet TurboMind's GPTQ rule: the recipe validates.
    r = load_recipe(write_recipe(tmp_path, GPTQ_TURBOMIND.replace("{gptq}", gptq)))
    variant = r.variants["gptq"]
    assert variant.compile.target == "turbomind"
    s = variant.quantize.format_settings()
    assert (s.fmt, s.bits, s.group_size, s.sym, s.permuted_g_idx) == ("gptq", 4, 128, True, False)


def test_default_settings_are_duo_scaling_and_static_act_order(tmp_path):
    from pipeline.quant.methods import AWQMethod, GPTQMethod
    from pipeline.stages.quantize import make_method

    text = "model: {{source: {model}}}\ncalibration: {{source: {calib}}}\nquantize: {{method: gptq}}\n" \
           "matrix: {{quantize.method: [gptq, awq]}}\n"
    r = load_recipe(write_recipe(tmp_path, text))
    awq, awq_config = make_method(r.variants["awq"].quantize)
    assert isinstance(awq, AWQMethod) and awq.duo_scaling is True
    assert AWQMethod(4, 128).duo_scaling is True  # the constructor agrees with the schema
    gptq, gptq_config = make_method(r.variants["gptq"].quantize)
    assert isinstance(gptq, GPTQMethod)
    assert (gptq.args["desc_act"], gptq.args["static_groups"]) == (True, True)
    # In-order g_idx, so loaders are told desc_act false; what ran is under meta.
    assert gptq_config["desc_act"] is False
    assert (gptq_config["meta"]["act_order"], gptq_config["meta"]["static_groups"]) == (True, True)


def test_hub_id_needs_a_pinned_revision(tmp_path):
    path = write_recipe(tmp_path, BASE.replace("{model}", "meta-llama/Llama-3.1-8B"))
    with pytest.raises(RecipeError, match="hub id 'meta-llama/Llama-3.1-8B' needs a pinned 'model.revision'"):
        load_recipe(path)


def test_group_size_must_divide_model_widths(tmp_path, tiny_llama_dir):
    import shutil

    model = tmp_path / "odd"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 704  # 704 = 11 * 64: not a multiple of 128
    (model / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{source: {model}}}\nquantize: {{method: rtn}}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "field 'quantize.w_group_size' (variant 'rtn'): 128 does not divide the model's intermediate_size 704; " \
           "valid group sizes for this model: 32, 64." in result.output
    assert "Traceback" not in result.output


def test_cli_validate_exit_codes(tmp_path):
    good = write_recipe(tmp_path, BASE)
    bad = write_recipe(tmp_path, BASE + "  nope: 1\n", "bad.yaml")
    ok = CliRunner().invoke(main, ["validate", str(good)])
    assert ok.exit_code == 0 and "valid; 1 variant(s): rtn" in ok.output
    res = CliRunner().invoke(main, ["validate", str(bad)])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "field 'quantize.nope': unknown key" in res.output
    missing = CliRunner().invoke(main, ["validate", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == 2 and "no such recipe file" in missing.output


def test_schema_is_json_schema_of_the_recipe():
    res = CliRunner().invoke(main, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert schema["title"] == "Recipe"
    assert {"model", "quantize", "matrix"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
