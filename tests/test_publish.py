"""Publishing: a tiny run publishes its passed variant to a folder for real (verified, relocatable, served), never
its failed one (exit 3); ``pipeline publish --dry-run`` writes nothing; the hub path goes to FakeHubStandIn (a
local stand-in for the hub's API: no network here) in one commit with the manifest and card, and the token never
shows up in outputs, logs, manifests or cards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST, TMP_PREFIX
from pipeline.cli import main
from pipeline.verify import verify_folder
from tests.conftest import write_recipe
from tests.fakehub import FakeHubStandIn

TOKEN = "hf_standinSECRETtoken0123456789"

# none passes (KL 0 to itself), rtn fails max_kl: one variant published, one not.
RECIPE = """\
name: pub
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 2, seq_len: 64}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 64, max_tokens: 256, gates: {{max_kl: 0.000001}}}}
publish: {{to: "file://{dest}/{{recipe}}-{{variant}}", commit_message: "a release"}}
matrix: {{quantize.method: [none, rtn]}}
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    dest = tmp / "published"
    recipe = write_recipe(tmp, RECIPE.replace("{dest}", str(dest)))
    res = invoke("run", str(recipe), "-o", str(tmp / "out"))
    return res, tmp / "out" / "pub", dest


def test_run_publishes_only_the_variant_whose_gates_passed(run):
    res, root, dest = run
    assert res.exit_code == 3, res.output
    assert "nothing is published for rtn." in res.output
    assert f"published none: file://{dest}/pub-none" in res.output
    assert sorted(p.name for p in dest.iterdir()) == ["pub-none"]  # rtn failed max_kl: nothing of it left
    folder = dest / "pub-none"
    assert verify_folder(folder) == []
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"README.md", MANIFEST, "engine.json", "model/config.json", "model/model.safetensors",
            "model/tokenizer.json"} <= names
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["kind"] == "publication" and manifest["variant"] == "none" and manifest["verdict"] == "pass"
    assert manifest["destination"] == "file://<local>/pub-none"
    assert manifest["metrics"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert {f["path"] for f in manifest["files"]} == names - {MANIFEST}
    # the stage's own artifact is the receipt; the runner skipped publish@rtn; no half-built folders remain
    receipts = [json.loads(p.read_text()) for p in root.glob("publish-*/publication.json")]
    assert [r["variant"] for r in receipts] == ["none"] and receipts[0]["status"] == "copied"
    assert not list(root.glob(f"{TMP_PREFIX}*")) and not list(dest.glob(".*"))
    assert "publish@rtn skipped: a quality gate failed" in (root / "run.log").read_text()


def test_published_folder_is_relocatable_and_loads(run, tmp_path):
    _, _, dest = run
    moved = tmp_path / "elsewhere"
    shutil.copytree(dest / "pub-none", moved)
    assert verify_folder(moved) == []
    engine = json.loads((moved / "engine.json").read_text())
    assert engine["model_dir"] == "model"  # no absolute path of the machine that built it
    text = (moved / MANIFEST).read_text()
    assert str(dest) not in text and '"destination": "file://<local>/pub-none"' in text
    import torch

    from pipeline.stages.compile import load_engine

    model, tok = load_engine(moved)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("def f(x):")])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_card_in_the_published_folder(run):
    _, _, dest = run
    card = (dest / "pub-none" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- quantship" in card
    assert "| perplexity |" in card and "| max_kl | 1e-06 | pass |" in card
    assert "pipeline serve ./pub-none --port 8000" in card and str(dest) not in card


def test_publish_again_is_unchanged_and_a_different_folder_is_refused(run):
    _, root, dest = run
    res = invoke("publish", str(root))
    assert res.exit_code == 3, res.output  # rtn is still a regression
    assert "not published: rtn: regression (1 gate(s) failed)" in res.output
    assert f"none: unchanged file://{dest}/pub-none" in res.output
    other = dest.parent / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a publication")
    res = invoke("publish", str(root), "--to", f"file://{other}", "--variant", "none")
    assert res.exit_code == 1
    assert f"error: {other} already holds other files. Nothing was copied." in res.output
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    res = invoke("publish", str(root), "--to", f"file://{other}", "--variant", "none", "--overwrite")
    assert res.exit_code == 0, res.output
    assert f"none: replaced file://{other}" in res.output and verify_folder(other) == []


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*")} if path.exists() else {}


def test_dry_run_lists_files_and_writes_nothing(run, tmp_path):
    _, root, _ = run
    before = _tree(root)
    res = invoke("publish", str(root), "--dry-run", "--to", f"file://{tmp_path}/dry-{{variant}}")
    assert res.exit_code == 3, res.output  # rtn refused, as without --dry-run
    assert f"none -> file://{tmp_path}/dry-none (" in res.output
    assert "  model/model.safetensors  " in res.output and "  README.md  " in res.output
    assert "manifest.json  (written at publish)" in res.output and "dry run: nothing was written." in res.output
    assert "rtn ->" not in res.output
    assert _tree(root) == before and list(tmp_path.iterdir()) == []


def test_hub_publish_through_the_stand_in(run, monkeypatch, tmp_path):
    _, root, _ = run
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        res = invoke("publish", str(root), "--to", "hf://acme/tiny-{variant}", "--variant", "none")
    assert res.exit_code == 0, res.output
    assert [c.repo_id for c in hub.commits] == ["acme/tiny-none"]  # one commit
    commit = hub.commits[0]
    assert commit.revision == "main" and commit.summary == "a release"  # the recipe's commit_message
    assert hub.repos["acme/tiny-none"]["private"] is True  # publish.private defaults to true
    manifest = json.loads(commit.files[MANIFEST])
    assert set(commit.files) == {f["path"] for f in manifest["files"]} | {MANIFEST}
    for f in manifest["files"]:
        assert len(commit.files[f["path"]]) == f["bytes"]
    card = commit.files["README.md"].decode()
    assert hub.validated == [card] and "hf download acme/tiny-none --local-dir tiny-none" in card
    assert f"commit {commit.oid}" in res.output
    # the token went only into the Authorization header
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert not any(TOKEN.encode() in r["body"] for r in hub.requests)
    assert not any(TOKEN.encode() in data for data in commit.files.values())
    assert TOKEN not in res.output and TOKEN not in (root / "run.log").read_text()
    assert not any(TOKEN in p.read_text(errors="replace") for p in root.rglob("*.json"))


def test_hub_revision_branch_and_public_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from pipeline.release.transport import upload_folder

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# x\n")
    (tmp_path / MANIFEST).write_text("{}")
    with FakeHubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        out = upload_folder(tmp_path, "acme/x", "v1", False, "msg")
    assert hub.repos["acme/x"] == {"private": False, "branches": {"main", "v1"}}
    assert [(c.revision, c.summary, sorted(c.files)) for c in hub.commits] == [("v1", "msg", ["README.md", MANIFEST])]
    assert out["status"] == "committed" and out["revision"] == "v1" and out["files"] == 2


def test_hub_offline_mode_is_a_clear_error(tmp_path):
    from pipeline.release.transport import PublishError, upload_folder

    with pytest.raises(PublishError, match="offline mode \\(HF_HUB_OFFLINE is set\\)"):
        upload_folder(tmp_path, "acme/x", None, True, "msg")


def test_hub_refusal_names_the_fix_without_the_token(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from pipeline.release.transport import PublishError, upload_folder

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "a.txt").write_text("a")
    with FakeHubStandIn(accept_token="hf_anotherTokenAltogether") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(PublishError) as err:
            upload_folder(tmp_path, "acme/x", None, True, "msg")
    assert str(err.value).startswith("publishing to hf://acme/x failed: Client error '401 Unauthorized'")
    assert "Log in (`hf auth login`) or set HF_TOKEN to a token with write access" in str(err.value)
    assert TOKEN not in str(err.value) and hub.commits == []


def recipe_with(tmp_path: Path, publish_block: str) -> Path:
    """RECIPE in ``tmp_path`` with its publish line replaced by ``publish_block`` (written as is)."""
    tmp_path.mkdir(exist_ok=True)
    path = write_recipe(tmp_path, RECIPE.replace("{dest}", str(tmp_path)))
    lines = [publish_block + "\n" if line.startswith("publish:") else line for line in path.read_text().splitlines(True)]
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("block, message", [
    ('publish: {to: "s3://bucket/x"}',
     "field 'publish.to': must be hf://ORG/NAME (a hub repo id) or file:///ABSOLUTE/PATH (got 's3://bucket/x')"),
    ('publish: {to: "file://relative/x"}', "must be hf://ORG/NAME (a hub repo id) or file:///ABSOLUTE/PATH"),
    ('publish: {to: "hf://acme/x-{name}"}', "unknown placeholder {name}; use {variant} or {recipe}"),
    ('publish: {to: "hf://acme/x"}', "field 'publish.to': 2 variants would be published to the same destination "
     "'hf://acme/x'. Put {variant} in it"),
    ('publish: {to: "hf://acme/x-{variant}", variants: [awq]}',
     "field 'publish.variants': no variant named 'awq'; the variants are none, rtn."),
])
def test_bad_publish_sections_are_recipe_errors(tmp_path, block, message):
    res = invoke("validate", str(recipe_with(tmp_path, block)))
    assert res.exit_code == 2 and message in res.output, res.output


def test_publish_needs_eval(tmp_path):
    path = recipe_with(tmp_path, 'publish: {to: "hf://acme/x-{variant}"}')
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("eval:")))
    res = invoke("validate", str(path))
    assert res.exit_code == 2 and "publish needs an eval section" in res.output, res.output


def test_plan_has_one_publish_run_per_chosen_variant_after_evaluate(tmp_path):
    from pipeline.plan import make_plan
    from pipeline.recipe_load import load_recipe

    text = RECIPE.replace('"file://{dest}/{{recipe}}-{{variant}}"', '"hf://acme/{{recipe}}-{{variant}}", variants: [rtn]')
    plan = make_plan(load_recipe(write_recipe(tmp_path, text)), tmp_path / "out")
    runs = [r for r in plan.runs if r.kind == "publish"]
    assert [(r.id, r.config["to"], r.deps) for r in runs] == [
        ("publish@rtn", "hf://acme/pub-rtn", {"compile": "compile@rtn", "evaluate": "evaluate@rtn"})]
    assert plan.runs[-1].kind == "publish" and "publish" not in plan.variant_runs["rtn"]
    assert os.path.basename(runs[0].dir).startswith("publish-")


def test_run_publishes_to_the_hub_stand_in_and_keeps_the_token_out(run, monkeypatch):
    """The publish stage itself (not only `pipeline publish`) on the hub path: the same recipe with an hf:// target,
    into the same output root, so only publish@none runs (rtn still fails its gate and is skipped)."""
    import huggingface_hub.constants as hf_constants

    _, root, dest = run
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = recipe_with(root.parent.parent / "hub-recipe",
                         'publish: {to: "hf://acme/{recipe}-{variant}", revision: rc1, private: false}')
    with FakeHubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        res = invoke("run", str(recipe), "-o", str(root.parent), "-v")
    assert res.exit_code == 3, res.output
    assert "published none: hf://acme/pub-none" in res.output and "nothing is published for rtn." in res.output
    assert [(c.repo_id, c.revision) for c in hub.commits] == [("acme/pub-none", "rc1")]
    assert hub.repos["acme/pub-none"] == {"private": False, "branches": {"main", "rc1"}}
    files = hub.commits[0].files
    assert {"README.md", MANIFEST, "engine.json", "model/model.safetensors"} <= set(files)
    assert "hf download acme/pub-none --local-dir pub-none --revision rc1" in files["README.md"].decode()
    receipts = {json.loads(p.read_text())["destination"]: json.loads(p.read_text())
                for p in root.glob("publish-*/publication.json")}
    assert receipts["hf://acme/pub-none"]["commit"] == hub.commits[0].oid
    assert TOKEN not in res.output and TOKEN not in (root / "run.log").read_text()
    assert not any(TOKEN in p.read_text(errors="replace") for p in root.rglob("*.json"))
    assert not any(TOKEN.encode() in data for data in files.values())


def test_serve_commands_of_a_vllm_artifact_name_every_engine_that_loads_it(tmp_path):
    """A folder built for vLLM (here: built, not run): the card gets vLLM's own command and SGLang's (it reads the same
    launch settings), with paths relative to the downloaded folder; targets that need their own build say so."""
    from pipeline.engines import vllm_engine
    from pipeline.engines.base import BuildContext
    from pipeline.formats.detect import detect_format
    from pipeline.recipe import CompileSection
    from pipeline.release.publish import Release, serve_entries
    from tests.conftest import TINY_MODEL

    art = tmp_path / "compile-x"
    fmt = detect_format(TINY_MODEL)
    vllm_engine.build(BuildContext(src=TINY_MODEL, fmt=fmt, cfg=CompileSection(target="vllm"), out=art,
                                   device="cuda", model_name="tiny-none"))
    (art / "engine.json").write_text(json.dumps({"target": "vllm", "format": fmt.__dict__, "model_dir": "model",
                                                 "model_name": "tiny-none"}))
    rel = Release(tmp_path, "tiny", "none", {}, {}, {"to": "hf://acme/tiny-none"}, art, {"method": "none"})
    entries = {e.target: e for e in serve_entries(rel, art, "tiny-none")}
    assert entries["pipeline"].command == "pipeline serve tiny-none --port 8000"
    assert entries["vllm"].command == (
        "vllm serve tiny-none/model --host 127.0.0.1 --port 8000 --served-model-name tiny-none "
        "--tensor-parallel-size 1 --max-model-len 2048 --gpu-memory-utilization 0.8 --max-num-seqs 128 "
        "--chat-template tiny-none/chat_template.jinja")
    assert entries["sglang"].command.startswith("python -m sglang.launch_server --model-path tiny-none/model ")
    assert str(tmp_path) not in entries["sglang"].command
    assert entries["turbomind"].command is None and "compile.target: turbomind" in entries["turbomind"].note
    assert "onnxruntime" not in entries  # no server of its own, and not the folder's target
