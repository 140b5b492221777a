"""What this machine has, and which targets it can build and run. Probes without importing vendor stacks
where a package's metadata is enough (importing lmdeploy or tensorrt_llm can take seconds or fail loudly)."""

from __future__ import annotations

import importlib.util
import platform
from importlib import metadata
from typing import Any

from pipeline.targets import TARGETS

_PACKAGES = ("torch", "transformers", "lmdeploy", "tensorrt_llm", "bitsandbytes", "onnxruntime", "gguf", "vllm",
             "torch_npu", "fastapi", "openai", "ray")


def package_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    for dist in (name, name.replace("_", "-")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "present"


def probe() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    facts["packages"] = {name: package_version(name) for name in _PACKAGES}
    facts["cuda"] = torch.cuda.is_available()
    facts["cuda_version"] = torch.version.cuda
    facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if facts["cuda"] else []
    facts["ascend"] = facts["packages"]["torch_npu"] is not None
    facts["cpu_int4_kernel"] = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    facts["targets"] = {name: target_status(name, facts) for name in TARGETS}
    return facts


def target_status(name: str, facts: dict[str, Any]) -> dict[str, Any]:
    """Can this quantship build the target's artifact, and can this machine run it? With the reason."""
    spec = TARGETS[name]
    pk = facts["packages"]
    if not spec.built:
        return {"build": False, "run": False, "why": f"not built into this version yet (needs {spec.needs})"}
    if name == "transformers":
        device = "CUDA " + ", ".join(facts["gpus"]) if facts["cuda"] else "CPU"
        return {"build": True, "run": True, "why": f"runs on {device}"}
    runnable = {
        "lmdeploy-pytorch": pk["lmdeploy"] is not None and (facts["cuda"] or facts["ascend"]),
        "turbomind": pk["lmdeploy"] is not None and facts["cuda"],
        "tensorrt-llm": pk["tensorrt_llm"] is not None and facts["cuda"],
        "onnxruntime": pk["onnxruntime"] is not None,
        "gguf": pk["gguf"] is not None,
        "vllm": pk["vllm"] is not None and facts["cuda"],
    }.get(name, False)
    return {"build": True, "run": runnable, "why": spec.needs}
