"""download (local folders, offline hub cache, broken folders) and calibrate (sources, determinism)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.artifacts import CALIB_TOKENS, MODEL_LINK, model_path
from pipeline.errors import CalibrationError, ModelFolderError
from pipeline.recipe_load import build_recipe
from pipeline.stages import StageContext
from pipeline.stages import calibrate, download
from tests.conftest import CALIB_TEXT


def ctx_for(tmp_path: Path, data: dict, kind: str, section, inputs=None) -> StageContext:
    loaded = build_recipe(data, tmp_path / "recipe.yaml")
    out = tmp_path / f"out-{kind}"
    out.mkdir()

    class View:
        variant = loaded.base
        resolve = staticmethod(loaded.resolve)

    return StageContext(kind, section(loaded.base), View(), inputs or {}, out)


def run_download(tmp_path, source, **model):
    data = {"model": {"source": str(source), **model}, "quantize": {"method": "none"}}
    ctx = ctx_for(tmp_path, data, "download", lambda r: r.model)
    metrics = download.run(ctx)
    return ctx.out, metrics


def test_local_folder_is_checked_not_copied(tmp_path, tiny_llama_dir):
    out, metrics = run_download(tmp_path, tiny_llama_dir)
    assert model_path(out) == tiny_llama_dir
    assert not (out / "model").exists()
    link = json.loads((out / MODEL_LINK).read_text())
    assert {f["path"] for f in link["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert metrics["architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_config", "has no config.json; it is not a Hugging Face model folder"),
        ("truncated", "model.safetensors is truncated: its header describes"),
        ("no_tokenizer", "has no tokenizer (tokenizer.json, tokenizer.model, vocab.json, tokenizer.tiktoken)"),
        ("pickle_only", "has only pickle weights (pytorch_model.bin); loading pickles can run arbitrary code"),
        ("garbage", "model.safetensors is not a valid safetensors file"),
    ],
)
def test_broken_model_folders(tmp_path, tiny_llama_dir, breakage, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    if breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif breakage == "pickle_only":
        weights.rename(folder / "pytorch_model.bin")
    elif breakage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFolderError) as e:
        run_download(tmp_path, folder)
    assert message in str(e.value)


def make_hub_cache(cache: Path, repo_id: str, revision: str, files_from: Path) -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it (stand-in for the unreachable hub)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    shutil.copytree(files_from, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_hub_id_through_snapshot_download_offline(tmp_path, tiny_llama_dir, monkeypatch):
    import huggingface_hub.constants as c

    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = make_hub_cache(tmp_path / "hub", "quantship-test/tiny", rev, tiny_llama_dir)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out, _ = run_download(tmp_path, "quantship-test/tiny", revision=rev)
    assert model_path(out) == snap
    link = json.loads((out / MODEL_LINK).read_text())
    assert link["repo_id"] == "quantship-test/tiny" and link["revision"] == rev


def test_hub_id_missing_offline_gets_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFolderError, match="is not in the Hugging Face cache and the hub cannot be reached"):
        run_download(tmp_path, "quantship-test/absent", revision="main")


def run_calibrate(tmp_path, model_dir, **calib):
    data = {"model": {"source": str(model_dir)}, "calibration": calib, "quantize": {"method": "none"}}
    dl = tmp_path / "dl"
    dl.mkdir(exist_ok=True)
    (dl / MODEL_LINK).write_text(json.dumps({"path": str(model_dir)}))
    ctx = ctx_for(tmp_path, data, f"calibrate{len(list(tmp_path.glob('out-*')))}", lambda r: r.calibration, {"download": dl})
    metrics = calibrate.run(ctx)
    from safetensors.torch import load_file

    return load_file(ctx.out / CALIB_TOKENS)["input_ids"], metrics


def test_calibration_is_deterministic_and_seeded(tmp_path, tiny_llama_dir):
    a, m = run_calibrate(tmp_path, tiny_llama_dir, source=str(CALIB_TEXT), samples=8, seq_len=64, seed=1)
    b, _ = run_calibrate(tmp_path, tiny_llama_dir, source=str(CALIB_TEXT), samples=8, seq_len=64, seed=1)
    c, _ = run_calibrate(tmp_path, tiny_llama_dir, source=str(CALIB_TEXT), samples=8, seq_len=64, seed=2)
    assert a.shape == (8, 64) and a.dtype.is_floating_point is False
    assert (a == b).all() and not (a == c).all()
    assert m["tokens_available"] > 10_000


def test_calibration_from_jsonl_and_errors(tmp_path, tiny_llama_dir):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"content": "word " * 50}) for _ in range(4)))
    ids, m = run_calibrate(tmp_path, tiny_llama_dir, source=str(jl), text_field="content", samples=2, seq_len=16)
    assert ids.shape == (2, 16) and m["documents"] == 4
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: no string field 'text'; set calibration.text_field"):
        run_calibrate(tmp_path, tiny_llama_dir, source=str(jl), samples=2, seq_len=16)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CalibrationError, match="fewer than calibration.seq_len 512"):
        run_calibrate(tmp_path, tiny_llama_dir, source=str(short), samples=2, seq_len=512)


def test_calibration_datasets_id_offline_error(tmp_path, tiny_llama_dir):
    pytest.importorskip("datasets")
    with pytest.raises(CalibrationError, match="cannot load dataset 'quantship-test/absent-dataset'"):
        run_calibrate(tmp_path, tiny_llama_dir, source="quantship-test/absent-dataset", samples=2, seq_len=16)
