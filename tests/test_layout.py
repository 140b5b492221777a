"""The house stays readable (issue 7 point 11): the math in ``pipeline/quant/`` imports no runtime.

``pipeline/quant/`` holds the quantization algorithms as torch functions (STYLE.md, layout: "primitives, observers,
awq, gptq, smoothquant, arch maps: torch only"). Engines, serving and stages depend on it, never the other way,
and vendor runtimes are imported only by ``pipeline/engines/``. bitsandbytes is the one method whose quantize step
is a runtime call (its ``Linear4bit`` quantizes as transformers materializes the weights), so it lives whole in
``pipeline/engines/bnb_engine.py`` and the rule below has no exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

QUANT_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "quant"
FORBIDDEN_PIPELINE = ("pipeline.engines", "pipeline.serve", "pipeline.stages")
VENDOR_RUNTIMES = ("bitsandbytes", "lmdeploy", "tensorrt_llm", "onnxruntime", "llama_cpp", "vllm")


def _is_under(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def imported_modules(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, at module level or inside any function or class: ``import
    a.b``, ``from a.b import c`` (also as ``a.b.c``, so ``from pipeline import engines`` is seen), relative imports
    resolved against ``pipeline.quant``, and ``__import__("a")`` / ``importlib.import_module("a")`` with a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..engines import y, relative to pipeline/quant/<file>.py
                base = ["pipeline", "quant"][: 3 - node.level] if node.level <= 2 else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def layout_violations(source: str) -> list[str]:
    """What in ``source`` breaks the rule for ``pipeline/quant/``, as ``line N: module``."""
    return [f"line {line}: {module}" for line, module in imported_modules(source)
            if _is_under(module, FORBIDDEN_PIPELINE) or _is_under(module, VENDOR_RUNTIMES)]


@pytest.mark.parametrize("path", sorted(QUANT_DIR.glob("*.py")), ids=lambda p: p.name)
def test_quant_imports_no_runtime_engine_serve_or_stage(path):
    bad = layout_violations(path.read_text())
    assert not bad, (
        f"pipeline/quant/{path.name} imports {', '.join(bad)}. pipeline/quant/ is torch-only math; move the code "
        "that needs a runtime into pipeline/engines/ (vendor runtimes) or pipeline/stages/ (walking a model)."
    )


def test_the_quant_folder_is_where_the_test_looks():
    names = {p.name for p in QUANT_DIR.glob("*.py")}
    assert {"primitives.py", "awq.py", "gptq.py", "smoothquant.py"} <= names
    assert "bnb.py" not in names  # bitsandbytes lives in pipeline/engines/bnb_engine.py and pipeline/formats/bnb.py


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import bitsandbytes", ["line 1: bitsandbytes"]),
        ("import bitsandbytes.functional as F", ["line 1: bitsandbytes.functional"]),
        ("def f():\n    from vllm import LLM", ["line 2: vllm", "line 2: vllm.LLM"]),
        ("class C:\n    def m(self):\n        import onnxruntime", ["line 3: onnxruntime"]),
        ("from pipeline.engines.transformers_engine import load_tokenizer",
         ["line 1: pipeline.engines.transformers_engine", "line 1: pipeline.engines.transformers_engine.load_tokenizer"]),
        ("from pipeline import engines", ["line 1: pipeline.engines"]),
        ("from ..stages import quantize", ["line 1: pipeline.stages", "line 1: pipeline.stages.quantize"]),
        ("import importlib\nimportlib.import_module('tensorrt_llm')", ["line 2: tensorrt_llm"]),
        ("def f():\n    return __import__('llama_cpp')", ["line 2: llama_cpp"]),
        ("from pipeline.serve.app import create_app", ["line 1: pipeline.serve.app", "line 1: pipeline.serve.app.create_app"]),
        ("import lmdeploy.turbomind", ["line 1: lmdeploy.turbomind"]),
        # allowed: torch, transformers (to walk a model), our own formats/errors/quant, triton, look-alike names
        ("import torch\nfrom transformers import AutoModelForCausalLM\nfrom pipeline.formats import awq_gemm\n"
         "from pipeline.errors import QuantizationError\nfrom . import primitives\nimport triton\n"
         "import vllm_like_but_not\nfrom pipeline.enginesque import x", []),
    ],
)
def test_the_rule_sees_each_kind_of_import(source, expected):
    assert layout_violations(source) == expected
