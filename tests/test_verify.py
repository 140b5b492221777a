"""pipeline verify: a fresh artifact verifies; a changed byte, a deleted file and an added file are named; a compile
artifact copied elsewhere still verifies, loads and names no local path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MODEL_LINK, commit_dir, new_tmp_dir
from pipeline.cli import main
from pipeline.verify import Problem, artifact_folders, pointer_note, verify_folder, verify_tree
from tests.conftest import ROOT, write_recipe

RECIPE = """\
name: verified
model: {{source: {model}}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("verify")
    res = invoke("run", str(write_recipe(tmp, RECIPE)), "-o", str(tmp / "outputs"))
    assert res.exit_code == 0, res.output
    return tmp / "outputs" / "verified"


def _one(root: Path, kind: str) -> Path:
    (folder,) = root.glob(f"{kind}-*")
    return folder


@pytest.fixture
def compile_copy(run_root, tmp_path) -> Path:
    """A copy of the compile artifact (copytree: its own inodes, so editing it never touches the run)."""
    return Path(shutil.copytree(_one(run_root, "compile"), tmp_path / "elsewhere" / "engine"))


def test_a_fresh_run_verifies(run_root):
    results = verify_tree(run_root)
    assert sorted(f.name.split("-")[0] for f in results) == ["compile", "download", "quantize"]
    assert all(problems == [] for problems in results.values())
    res = invoke("verify", str(run_root))
    assert res.exit_code == 0, res.output
    assert "3 artifact folder(s) verified" in res.output
    assert invoke("verify", str(_one(run_root, "compile"))).exit_code == 0


def test_a_changed_byte_is_named(compile_copy):
    weights = compile_copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, one bit off
    weights.write_bytes(bytes(data))
    assert verify_folder(compile_copy) == [Problem("changed", "model/model.safetensors")]
    res = invoke("verify", str(compile_copy))
    assert res.exit_code == 1
    assert "FAILED  engine: model/model.safetensors: changed (sha256 differs)" in res.output
    assert "1 of 1 artifact folder(s) do not match their manifests" in res.output


def test_a_deleted_and_an_added_file_are_named(compile_copy):
    (compile_copy / "model" / "tokenizer.json").unlink()
    (compile_copy / "model" / "extra.bin").write_bytes(b"\0")
    assert verify_folder(compile_copy) == [Problem("missing", "model/tokenizer.json"),
                                           Problem("added", "model/extra.bin")]
    res = invoke("verify", str(compile_copy))
    assert res.exit_code == 1
    assert "model/tokenizer.json: missing" in res.output
    assert "model/extra.bin: added (not in the manifest)" in res.output


def test_a_run_folder_names_only_the_changed_artifact(run_root, tmp_path):
    copy = Path(shutil.copytree(run_root, tmp_path / "run"))
    engine = _one(copy, "compile") / "engine.json"
    engine.write_text(engine.read_text().replace('"cpu"', '"cuda"'))
    results = verify_tree(copy)
    bad = {f.name.split("-")[0]: p for f, p in results.items() if p}
    assert bad == {"compile": [Problem("changed", "engine.json")]}
    res = invoke("verify", str(copy))
    assert res.exit_code == 1 and "engine.json: changed" in res.output and "ok  quantize-" in res.output


def test_no_manifest_and_nothing_to_verify(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    assert artifact_folders(tmp_path) == []
    res = invoke("verify", str(tmp_path))
    assert res.exit_code == 1
    assert "is neither an artifact folder" in res.output and "nothing to verify" in res.output
    assert verify_folder(tmp_path / "a") == [Problem("manifest", "", "no manifest.json")]


def test_a_pointer_is_explained_and_its_target_checked(tmp_path):
    src = tmp_path / "model-src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    from pipeline.artifacts import sha256_file

    final = tmp_path / "out" / "download-abc"
    tmp = new_tmp_dir(final)
    files = [{"path": "config.json", "bytes": 2, "sha256": sha256_file(src / "config.json")}]
    (tmp / MODEL_LINK).write_text(json.dumps({"path": str(src), "kind": "local", "files": files}))
    commit_dir(tmp, final, {"stage": "download"})
    assert verify_folder(final) == []
    assert "not a publishable artifact" in pointer_note(final) and "model-src" in pointer_note(final)
    (src / "config.json").write_text("[]")  # same size, other bytes: the local folder changed since it was checked
    assert verify_folder(final) == [Problem("source-changed", "model.json -> config.json")]
    res = invoke("verify", str(final))
    assert res.exit_code == 1 and "has changed since it was checked" in res.output
    (src / "config.json").unlink()
    assert verify_folder(final) == [Problem("source-missing", "model.json -> config.json")]


def test_a_copied_compile_artifact_verifies_loads_and_names_no_local_path(run_root, compile_copy):
    import torch

    from pipeline.stages.compile import load_engine, read_engine

    assert verify_folder(compile_copy) == []
    engine = read_engine(compile_copy)
    assert engine["model_dir"] == "model" and engine["absolute_paths"] == []
    assert engine["source_artifact"] == f"../{_one(run_root, 'quantize').name}"
    roots = {str(run_root.parent.parent), str(ROOT), str(Path.home())}
    for p in compile_copy.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".jinja", ".txt", ".log", ".md", ""):
            text = p.read_text(errors="replace")
            assert not [r for r in roots if r in text], p
    original, tok = load_engine(_one(run_root, "compile"))
    copied, tok2 = load_engine(compile_copy)
    ids = torch.tensor([tok("def sort(xs):")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, copied(ids).logits)
    assert tok2("x")["input_ids"] == tok("x")["input_ids"]


def test_a_copy_without_its_quantize_sibling_says_so(compile_copy):
    from pipeline.errors import ModelFolderError
    from pipeline.stages.compile import source_model_dir

    with pytest.raises(ModelFolderError, match="copied without it"):
        source_model_dir(compile_copy)


def test_source_model_dir_reads_the_sibling(run_root):
    from pipeline.stages.compile import source_model_dir

    got = source_model_dir(_one(run_root, "compile"))
    assert got.resolve() == (_one(run_root, "quantize") / "model").resolve()


def test_a_copied_compile_artifact_serves(compile_copy):
    from pipeline.serve.server import smoke_test, start_server
    from pipeline.stages.serve import build_app

    with start_server(build_app(compile_copy, api_key=None, model_name="copied")) as running:
        reply = smoke_test(running.url, "copied", max_tokens=4)
    assert reply["usage"]["completion_tokens"] >= 1 and reply["reply"]
