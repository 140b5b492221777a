"""What this machine has, and which targets it can build and run. Probes without importing vendor stacks
where a package's metadata is enough (importing lmdeploy or tensorrt_llm can take seconds or fail loudly)."""

from __future__ import annotations

import platform
from typing import Any

from pipeline.engines.base import package_present
from pipeline.targets import TARGETS, engine_module

_PACKAGES = ("torch", "transformers", "lmdeploy", "tensorrt_llm", "vllm", "sglang", "bitsandbytes", "onnxruntime",
             "onnxruntime_genai", "gguf", "llama_cpp", "torch_npu", "fastapi", "openai", "ray")


def probe() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    facts["packages"] = {name: package_present(name) for name in _PACKAGES}
    facts["cuda"] = torch.cuda.is_available()
    facts["cuda_version"] = torch.version.cuda
    facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if facts["cuda"] else []
    facts["ascend"] = facts["packages"]["torch_npu"] is not None
    facts["cpu_int4_kernel"] = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    facts["targets"] = {name: target_status(name) for name in TARGETS}
    return facts


def target_status(name: str) -> dict[str, Any]:
    """Can this quantship build the target's artifact, and can this machine run it, per device? With the reason."""
    spec = TARGETS[name]
    if not spec.built:
        return {"build": False, "run": False, "status": "not built", "why": f"not built into this version yet "
                f"(needs {spec.needs})", "devices": {}}
    module = engine_module(name)
    devices = {d: module.available(d) for d in spec.devices}
    runs = [d for d, a in devices.items() if a.runs]
    why = "; ".join(f"{d}: {a.why}" for d, a in devices.items())
    return {
        "build": True,
        "run": bool(runs),
        "status": f"runs here ({', '.join(runs)})" if runs else "inputs only here",
        "why": why,
        "devices": {d: {"runs": a.runs, "why": a.why} for d, a in devices.items()},
    }
