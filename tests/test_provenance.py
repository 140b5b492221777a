"""Provenance in every manifest (recipe without secrets, source commit, calibration hash, tools, CUDA, project
version), and no secret anywhere in a run's outputs; the pure pieces of pipeline/provenance.py exactly."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import __version__
from pipeline.artifacts import CALIB_TOKENS, MANIFEST, MODEL_LINK
from pipeline.cli import main
from pipeline.provenance import (
    MASK,
    calibration_hash,
    cuda_facts,
    environment,
    portable,
    redact,
    resolve_source,
    scrub_text,
    stage_packages,
)
from tests.conftest import TINY_MODEL, write_recipe

HF_SECRET = "hf_provenanceTESTsecret0123456789"
KEY_SECRET = "sk-recipe-key-TEST-9876543210"
RECIPE = """\
name: prov
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
# the fewest AWQ steps: the facts, not the quality, are tested
quantize: {{method: awq, awq: {{n_grid: 2, clip: false}}}}
compile: {{target: transformers, device: cpu}}
serve: {{max_tokens: 4, api_key: "${{QS_PROV_TEST_KEY}}"}}
"""


@pytest.fixture(scope="module")
def prov_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prov")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", HF_SECRET)
        mp.setenv("QS_PROV_TEST_KEY", KEY_SECRET)
        res = CliRunner().invoke(main, ["run", str(write_recipe(tmp, RECIPE)), "-o", str(tmp / "outputs"), "-vv"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert HF_SECRET not in res.output and KEY_SECRET not in res.output
    return tmp / "outputs" / "prov"


def manifests(root: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["stage"]: json.loads(p.read_text()) for p in root.glob(f"*/{MANIFEST}")}


def test_every_manifest_carries_provenance(prov_run):
    ms = manifests(prov_run)
    assert set(ms) == {"download", "calibrate", "quantize", "compile", "serve"}
    link = json.loads(next(prov_run.glob(f"download-*/{MODEL_LINK}")).read_text())
    fingerprint = hashlib.sha256(json.dumps([[f["path"], f["sha256"]] for f in link["files"]],
                                            sort_keys=True).encode()).hexdigest()
    for stage, m in ms.items():
        assert m["quantship"] == __version__ == m["environment"]["quantship"], stage
        tools = m["environment"]["tools"]
        assert tools["torch"] == metadata.version("torch") and tools["transformers"] == metadata.version("transformers")
        cuda = m["environment"]["cuda"]
        assert set(cuda) == {"torch_cuda", "driver", "gpus", "why"}
        assert cuda["driver"] is not None or cuda["why"], stage  # a figure, or why there is none
        src = m["source"]
        assert src["id"] == "tiny-llama-pydocs" and src["kind"] == "local" and src["fingerprint"] == fingerprint
        assert src["commit_why"]
        assert m["recipe"]["quantize"]["method"] == "awq" and m["recipe"]["serve"]["api_key"] == MASK
        assert m["recipe"]["model"]["source"] == "<local>/tiny-llama-pydocs"  # no path of this machine
        assert m["recipe_file"] == "recipe.yaml"
        assert {f["path"] for f in m["files"]}  # sha256 per file (checked in test_verify)
    # The calibration tokens the AWQ run used: hashed independently of the safetensors header parsing.
    from safetensors.torch import load_file

    tokens = load_file(next(prov_run.glob(f"calibrate-*/{CALIB_TOKENS}")))["input_ids"]
    want = hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()
    for stage in ("calibrate", "quantize", "compile", "serve"):
        calib = ms[stage]["calibration"]
        assert calib["sha256_tokens"] == want and calib["shape"] == [4, 64] and calib["dtype"] == "I64", stage
    assert ms["download"]["calibration"] is None


def test_the_source_commit_is_the_checkout_head():
    head = subprocess.run(["git", "-C", str(TINY_MODEL), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tree is not a git checkout here")
    src = resolve_source(TINY_MODEL, {"kind": "local", "path": str(TINY_MODEL)}, [])
    assert src["commit"] == head.stdout.strip() and src["commit_from"] == "git"


def test_no_secret_lands_in_any_output(prov_run):
    hits = [p for p in prov_run.rglob("*") if p.is_file()
            and (HF_SECRET.encode() in p.read_bytes() or KEY_SECRET.encode() in p.read_bytes())]
    assert hits == []
    assert (prov_run / "run.log").is_file()  # the debug log was written too, and holds neither


def test_redact_masks_secret_fields_env_values_and_url_credentials():
    from pydantic import SecretStr

    env = {"HF_TOKEN": "hf_abcdefghijkl", "MY_SERVICE_API_KEY": "key-1234567890", "PATH": "/usr/bin:/bin"}
    data = {"serve": {"api_key": SecretStr("x"), "max_tokens": 16}, "hub": {"token": "literal-token-value"},
            "tokenizer": {"eos_token": "</s>", "pad_token_id": 0}, "publish": {"hf_token": "t"},
            "headers": {"Authorization": "Bearer zzz"}, "note": "export HF_TOKEN=hf_abcdefghijkl",
            "to": "https://user:pw@example.org/repo", "password": None, "args": ["--key", "key-1234567890"]}
    assert redact(data, env) == {
        "serve": {"api_key": MASK, "max_tokens": 16}, "hub": {"token": MASK},
        "tokenizer": {"eos_token": "</s>", "pad_token_id": 0}, "publish": {"hf_token": MASK},
        "headers": {"Authorization": MASK}, "note": f"export HF_TOKEN={MASK}",
        "to": f"https://{MASK}@example.org/repo", "password": None, "args": ["--key", MASK]}
    assert scrub_text("token hf_abcdefghijkl at https://a:b@h/x", env) == f"token {MASK} at https://{MASK}@h/x"


def test_portable_hides_local_paths_only():
    assert portable({"a": "/home/me/models/llama", "b": ["rel/x", "https://h/x"], "c": 3, "d": Path("/tmp/y.txt")}) \
        == {"a": "<local>/llama", "b": ["rel/x", "https://h/x"], "c": 3, "d": "<local>/y.txt"}


def test_calibration_hash_is_the_tensor_bytes(tmp_path):
    import torch
    from safetensors.torch import save_file

    ids = torch.arange(24, dtype=torch.long).reshape(3, 8) * 977
    save_file({"input_ids": ids, "other": torch.ones(5)}, str(tmp_path / CALIB_TOKENS))
    got = calibration_hash(tmp_path / CALIB_TOKENS)
    assert got["sha256_tokens"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    assert got["shape"] == [3, 8] and got["dtype"] == "I64"
    assert got["sha256_file"] == hashlib.sha256((tmp_path / CALIB_TOKENS).read_bytes()).hexdigest()


def test_source_commit_of_a_hub_snapshot_a_plain_folder_and_a_git_checkout(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--org--name" / "snapshots" / commit
    snap.mkdir(parents=True)
    files = [{"path": "config.json", "sha256": "ab" * 32}]
    hub = resolve_source(snap, {"kind": "hub", "repo_id": "org/name", "revision": "main"}, files)
    assert (hub["id"], hub["kind"], hub["revision"], hub["commit"]) == ("org/name", "hub", "main", commit)
    plain = tmp_path / "plain"
    plain.mkdir()
    local = resolve_source(plain, {"kind": "local"}, files)
    assert local["commit"] is None and "fingerprint" in local["commit_why"] and local["id"] == "plain"
    assert local["fingerprint"] == hub["fingerprint"]  # the same files: the same fingerprint
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "config.json").write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "m"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    checked = resolve_source(repo / "m", {"kind": "local"}, files)
    assert checked["commit"] == head and "no uncommitted changes" in checked["commit_why"]
    (repo / "m" / "config.json").write_text('{"x": 1}')
    assert "uncommitted changes" in resolve_source(repo / "m", {"kind": "local"}, files)["commit_why"]


def test_environment_never_fails_and_names_the_engine_packages():
    env = environment(("no-such-distribution-xyz",))
    assert env["tools"]["no-such-distribution-xyz"] == "absent" and env["quantship"] == __version__
    facts = cuda_facts()
    import torch

    assert facts["torch_cuda"] == torch.version.cuda
    assert stage_packages("quantize", {"method": "bnb-nf4"}) == ("bitsandbytes",)
    assert stage_packages("quantize", {"method": "awq"}) == ()
    assert stage_packages("compile", {"target": "turbomind"}) == ("lmdeploy",)
    assert stage_packages("evaluate", {"tasks": ["x"]}) == ("lm_eval",)


def test_plan_keys_read_only_the_base_tools():
    from pipeline.plan import tool_versions

    # The cache keys hash tool_versions(): the engine and quantizer packages a manifest names stay out of them.
    assert set(tool_versions()) == {"quantship", "torch", "transformers", "safetensors", "tokenizers"}
    assert set(tool_versions(("bitsandbytes",))) == set(tool_versions()) | {"bitsandbytes"}


def test_commit_dir_masks_a_secret_a_stage_put_in_its_metrics(tmp_path, monkeypatch):
    from pipeline.artifacts import commit_dir, new_tmp_dir, read_manifest

    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    final = tmp_path / "quantize-abc"
    tmp = new_tmp_dir(final)
    (tmp / "x.txt").write_text("x")
    commit_dir(tmp, final, {"metrics": {"log": f"used {HF_SECRET}", "time_to_first_token": 0.5}})
    m = read_manifest(final)
    assert m["metrics"] == {"log": f"used {MASK}", "time_to_first_token": 0.5}
    assert HF_SECRET not in (final / MANIFEST).read_text() and m["files"][0]["path"] == "x.txt"


def test_a_hub_revision_resolves_to_the_snapshot_commit(tmp_path, tiny_llama_dir, monkeypatch):
    """Through the download stage and a hub cache laid out as huggingface_hub writes it (stand-in for the hub,
    unreachable here): the branch 'main' resolves, through refs/main, to the commit the snapshot holds."""
    import huggingface_hub.constants as c

    from tests.test_download_calibrate import make_hub_cache, run_download

    rev = "89abcdef0123456789abcdef0123456789abcdef"
    make_hub_cache(tmp_path / "hub", "quantship-test/tiny", rev, tiny_llama_dir)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out, metrics = run_download(tmp_path, "quantship-test/tiny", revision="main")
    source = json.loads((out / MODEL_LINK).read_text())["source"]
    assert (source["id"], source["kind"], source["revision"], source["commit"]) == \
        ("quantship-test/tiny", "hub", "main", rev)
    assert metrics["commit"] == rev
