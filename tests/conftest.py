"""Shared fixtures: tiny models made from a config, the shipped trained model, recipes in tmp folders,
and a guard that fails any test writing into the repository."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Tests never reach a hub: set before huggingface_hub / datasets read them at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-llama-pydocs"
CALIB_TEXT = ROOT / "calibration" / "pydocs-calib.txt"
EVAL_TEXT = ROOT / "data" / "eval" / "pydocs-heldout.txt"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


# Where a stray write would land: the default outputs folder, the shipped fixtures, the repository root.
_GUARDED = ("outputs", "models", "data", "calibration", "recipes", ":(glob)*")


def _repo_status() -> str:
    try:
        return subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", *_GUARDED],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout
    except OSError:  # no git (a copy of the tree on another machine): nothing to compare
        return ""


@pytest.fixture(scope="session", autouse=True)
def _no_writes_into_the_repo():
    """Tests write only into their tmp folders: the repository's status must not change during the session."""
    before = _repo_status()
    yield
    after = _repo_status()
    assert after == before, f"tests wrote into the repository:\n{after}"


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    """A recipe file in ``tmp_path``; ``{model}``, ``{calib}``, ``{eval}`` expand to the shipped fixtures."""
    path = tmp_path / name
    path.write_text(text.format(model=TINY_MODEL, calib=CALIB_TEXT, eval=EVAL_TEXT))
    return path


def load_tiny(device: str = "cpu"):
    """The shipped tiny model (float32, eval mode, on ``device``) and its tokenizer, as the serving tests use them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama folder (safetensors + the shipped tokenizer) whose widths suit group size 128."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_llama(out: Path, layers: int = 2, hidden: int = 256, intermediate: int = 768, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


OUTLIER_WIDTH = 256
OUTLIERS = (3, 77, 150, 201)  # input channels whose activations are 30x larger (LLM-style outlier channels)


def make_outlier_activations(n_tokens: int, width: int = OUTLIER_WIDTH, outliers=OUTLIERS, factor: float = 30.0,
                             seed: int = 0):
    """Gaussian activations [n_tokens, width] with a few fixed channels scaled by ``factor`` (the norm outputs
    AWQ and SmoothQuant target)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, width, generator=g)
    x[:, list(outliers)] *= factor
    return x


def make_weight(out_features: int, in_features: int = OUTLIER_WIDTH, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.02


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (servers and schedulers on 2 shared cores), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_interpreted(child: str) -> list:
    """Run ``child`` (Python source whose last printed line is JSON) in a fresh process under Triton's interpreter
    (``TRITON_INTERPRET=1``: Triton kernels on the CPU, numpy arithmetic; it must be chosen before triton is first
    imported, hence the process); the parsed JSON back."""
    import json
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", child.format(tests=str(ROOT / "tests"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
