"""Every compile artifact keeps what serving needs beside the weights — tokenizer files, chat template,
generation config and EOS ids — for every format every target loads (issue 7 point 9), so no engine has to
guess a template from a folder name."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST, model_path
from pipeline.cli import main
from pipeline.engines.base import BuildContext, chat_template_text, serving_files
from pipeline.formats.detect import detect_format
from pipeline.recipe import CompileSection
from pipeline.targets import TARGETS, check_target_loads, engine_module
from tests.conftest import TINY_MODEL, write_recipe

RECIPE = """
name: formats
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: rtn, device: cpu, fp8: {{block: true}}}}
matrix:
  quantize.method: [none, rtn, gptq, smoothquant, fp8]
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("formats")
    res = CliRunner().invoke(main, ["run", str(write_recipe(tmp, RECIPE)), "-o", str(tmp / "out")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = {}
    for m in (json.loads(p.read_text()) for p in (tmp / "out" / "formats").glob(f"quantize-*/{MANIFEST}")):
        folder = model_path(tmp / "out" / "formats" / f"quantize-{m['key'][:12]}")
        out[detect_format(folder).fmt] = folder
    return out


def _cases():
    for target, spec in TARGETS.items():
        if spec.built and target != "transformers":  # the embedded target reads the quantized folder in place
            for fmt in ("hf", "awq", "gptq", "w8a8", "fp8"):
                if fmt in spec.loads:
                    yield target, fmt


@pytest.mark.slow
@pytest.mark.parametrize("target, fmt", list(_cases()))
def test_serving_files_survive_every_format_and_target(folders, tmp_path, target, fmt):
    src = folders[fmt]
    settings = detect_format(src)
    if check_target_loads(target, settings):
        pytest.skip(f"{target} does not load this {fmt} folder's settings: {check_target_loads(target, settings)}")
    module = engine_module(target)
    cfg = CompileSection(target=target)
    ctx = BuildContext(src=src, fmt=settings, cfg=cfg, out=tmp_path, device=TARGETS[target].devices[0],
                       model_name="formats-test")
    build = module.build(ctx) or {}
    model_dir = tmp_path / build.get("model_dir", "model")
    want, got = serving_files(TINY_MODEL), serving_files(model_dir)
    assert got["tokenizer"] == want["tokenizer"] and got["tokenizer"], (target, fmt)
    assert got["chat_template"] and chat_template_text(model_dir) == chat_template_text(TINY_MODEL)
    assert got["generation_config"] and got["eos_token_id"] == want["eos_token_id"] is not None
