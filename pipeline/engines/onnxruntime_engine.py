"""The ``onnxruntime`` target: an ONNX graph whose int4 linears are ``MatMulNBits`` (com.microsoft) carrying the
quantized checkpoint's own integers, run by ONNX Runtime (CPU here; CUDA where onnxruntime-gpu is installed).

Exporter: onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``, pip ``onnxruntime-genai``,
read and run at 0.18.0), the field's own exporter, not a graph of ours. Why it fits, from its source:

- ``models/builder.py`` ``create_model`` picks the decoder class from ``config.architectures`` (Llama, Mistral,
  Qwen2/3, Phi, Gemma, ...) and writes ``model.onnx`` + ``model.onnx.data`` (weights always as external data) +
  ``genai_config.json`` + tokenizer files; on CPU it uses GroupQueryAttention (causal, rotary inside),
  SkipSimplifiedLayerNormalization and, for a quantized folder, one MatMulNBits per linear (q/k/v fused into one
  ``qkv_proj`` along N).
- A folder with ``quantization_config`` (``quant_method`` awq or gptq) goes through ``models/loaders/awq.py`` /
  ``gptq.py`` / ``base.py`` (``QuantizedModel``): ``qweight``/``qzeros`` are unpacked (AWQ's 0,2,4,6,1,3,5,7 order
  reversed; GPTQ's stored ``zero - 1`` given back its ``+ 1``), dequantized with the checkpoint's scales and zeros
  and re-rounded on the SAME grid (``dequant_weight`` then ``quant_weight``), then packed by ``pack_ort_format``.
  That round trip returns the same integers whenever ``(q - z)·s`` is exact enough in fp16, which it is for
  codes < 16; it is not trusted: ``build`` decodes every MatMulNBits initializer of the result and compares it
  with our checkpoint's codes, zeros and scales exactly (``verify_codes``), and fails the stage otherwise. GPTQ's
  ``g_idx`` is kept only for ``desc_act: true``; the targets row refuses a permuted ``g_idx``.
- ``lm_head`` is left unquantized in our checkpoints; the builder's ``-p int4`` would re-quantize every remaining
  float MatMul with its own RTN, so ``nodes_to_exclude=/lm_head/MatMul`` keeps it a plain fp32 MatMul (any other
  MatMulNBits that is not ours fails ``verify_codes``). The unquantized reference (format ``hf``) is exported with
  ``-p fp32``: plain MatMul everywhere.
- ``accuracy_level`` is set to 1 (fp32 activations in MatMulNBits) so the graph computes what our runtime
  computes; the builder's CPU default, 4 (int8 activations), is faster but moves logits further.

Evaluation (``load``) runs the graph in one full-sequence pass: empty past key/values, an all-ones attention mask,
``logits`` [B, T, V]. There is no OpenAI-compatible server for it (onnxruntime-genai ships none), so
``serve_command`` returns None and the serve stage records 'not served'.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from pipeline.engines.base import ARTIFACT_MODEL, Availability, package_present
from pipeline.errors import QuantizationError, TargetUnavailable

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
BUILDER_LOG = "builder.log"
ACCURACY_LEVEL = 1  # MatMulNBits: 1 = fp32 activations (0 unset, 2 fp16, 3 bf16, 4 int8)
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def available(device: str) -> Availability:
    """ONNX Runtime runs where ``onnxruntime`` imports; CUDA needs its CUDA execution provider (onnxruntime-gpu)."""
    version = package_present("onnxruntime")
    if version is None:
        return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
    if device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return Availability(False, f"onnxruntime {version} has no CUDAExecutionProvider (install onnxruntime-gpu)")
        from pipeline.engines.base import cuda_devices

        gpus = cuda_devices()
        if not gpus:
            return Availability(False, "no CUDA device visible")
        return Availability(True, f"onnxruntime {version} on CUDA {', '.join(gpus)}")
    return Availability(True, f"onnxruntime {version} on the CPU")


def build(ctx) -> dict:
    """Export ``ctx.src`` with onnxruntime-genai's model builder into ``ctx.out/model`` and check that every
    MatMulNBits holds our integers."""
    from pipeline.formats.checkpoint import copy_side_files, read_config

    fmt = ctx.fmt.fmt
    if fmt not in ("hf", "awq", "gptq"):
        raise QuantizationError(f"the onnxruntime target exports hf, awq and gptq folders, not {fmt!r}.")
    if fmt != "hf":
        from pipeline.formats.matmulnbits import check_block_size

        check_block_size(int(ctx.fmt.group_size or 128), where=f"{ctx.src}: ")
        qc = read_config(ctx.src).get("quantization_config") or {}
        if fmt == "gptq" and qc.get("checkpoint_format", qc.get("format", "gptq")) != "gptq":
            # loaders/gptq.py handle_qzeros adds 1 to every stored zero (the v1 convention) unconditionally.
            raise QuantizationError(
                f"{ctx.src} is a {qc.get('checkpoint_format', qc.get('format'))} GPTQ checkpoint; onnxruntime-genai's "
                "builder reads only the classic v1 layout (zeros stored minus one). Quantize with the default "
                "checkpoint format (gptq)."
            )
    for pkg in ("onnxruntime_genai", "onnx_ir", "onnx"):
        if package_present(pkg) is None:
            raise TargetUnavailable(
                f"the onnxruntime target exports with onnxruntime-genai's model builder, but {pkg} is not installed. "
                "Install it (pip install onnxruntime-genai onnx onnx_ir, or quantship's test extra) and re-run."
            )
    execution_provider = "cuda" if ctx.device == "cuda" else "cpu"
    precision = "int4" if fmt != "hf" else ("fp16" if execution_provider == "cuda" else "fp32")
    options = {"accuracy_level": str(ACCURACY_LEVEL), "nodes_to_exclude": "/lm_head/MatMul",
               "hf_token": "false", "hf_remote": "true" if ctx.trust_remote_code else "false"}
    model_dir = ctx.out / ARTIFACT_MODEL
    ctx.log.info("exporting %s (%s) with onnxruntime-genai's builder: -p %s -e %s", ctx.src, fmt, precision,
                 execution_provider)
    run_builder(ctx.src, model_dir, precision, execution_provider, options, ctx.out / BUILDER_LOG)
    copy_side_files(ctx.src, model_dir)  # the source's tokenizer, chat template and generation config, unchanged
    checked = verify_codes(model_dir / MODEL_FILE, ctx.src, fmt, read_config(ctx.src).get("quantization_config") or {})
    files = sorted(p.name for p in model_dir.iterdir())
    return {"exporter": f"onnxruntime-genai {package_present('onnxruntime_genai')} model builder",
            "precision": precision, "execution_provider": execution_provider, "accuracy_level": ACCURACY_LEVEL,
            "matmulnbits_checked": checked, "files": files, "log": BUILDER_LOG}


def run_builder(src: Path, out: Path, precision: str, execution_provider: str, options: dict, log_file: Path) -> None:
    """onnxruntime-genai's ``builder.py`` main (``parse_extra_options`` then ``create_model``) in process, its
    prints, progress bars and log records into ``log_file`` (in process: a subprocess would import torch and
    transformers again, seconds per build on a small CPU)."""
    failure: Exception | None = None
    with open(log_file, "w", encoding="utf-8") as log, _confined(log), tempfile.TemporaryDirectory() as cache:
        try:
            from onnxruntime_genai.models import builder
        except ImportError as e:
            raise TargetUnavailable(
                f"onnxruntime-genai's model builder cannot be imported ({e}); install onnxruntime-genai, onnx and "
                "onnx_ir into the environment that runs the pipeline."
            ) from e
        kv = [f"{k}={v}" for k, v in options.items()]
        try:
            extra = builder.parse_extra_options(None, str(src), str(out), precision, execution_provider, cache, kv)
            builder.create_model(None, str(src), str(out), precision, execution_provider, cache, **extra)
        except Exception as e:  # the builder raises bare Exception/NotImplementedError/AssertionError
            failure = e
    _relative_log(log_file, {str(out): "<artifact>/model", str(out.parent): "<artifact>", str(src): "<source model>",
                             cache: "<builder cache>"})
    if failure is not None:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise QuantizationError(
            f"onnxruntime-genai's model builder could not export {src} ({type(failure).__name__}: {failure}); an "
            "architecture it does not know, or a quantized layout it does not read, ends here. Use another compile "
            "target for this model. The end of its log:\n" + "\n".join(tail)
        ) from failure


def _relative_log(log_file: Path, names: dict[str, str]) -> None:
    """The builder prints the absolute folders it worked in; the artifact names them by role instead, so a copied
    or published folder points at no local path."""
    text = log_file.read_text(encoding="utf-8", errors="replace")
    for path, role in sorted(names.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, role)
    log_file.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _confined(log):
    """stdout, stderr and the root logger into ``log`` for the duration, then exactly as they were.

    onnxruntime's ``quantization/matmul_nbits_quantizer.py`` calls ``logging.basicConfig(level=INFO)`` when it is
    imported (by the builder): without this, a root handler bound to the redirected stream and an INFO root level
    would outlive the build."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.StreamHandler(log)
    root.handlers[:] = [ours]
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _our_names(onnx_prefix: str) -> list[str]:
    """Checkpoint linear names behind a MatMulNBits node of the builder (``model.layers.0.attn.qkv_proj`` ->
    ``model.layers.0.self_attn.{q,k,v}_proj``)."""
    head, _, leaf = onnx_prefix.rpartition(".")
    head = head.replace(".attn", ".self_attn") if head.endswith(".attn") else head
    parts = _FUSED.get(leaf, (leaf,))
    return [f"{head}.{p}" if head else p for p in parts]


def verify_codes(onnx_path: Path, src: Path, fmt: str, quant_config: dict) -> int:
    """Decode every MatMulNBits of ``onnx_path`` and compare it with the codes, zero points and scales of the
    checkpoint ``src``, exactly. Every quantized linear of the checkpoint must appear; a MatMulNBits that is not
    ours (a layer the exporter quantized itself) is an error. Returns how many linears were checked."""
    import onnx
    import torch
    from onnx import numpy_helper

    from pipeline.formats.checkpoint import open_checkpoint
    from pipeline.formats.matmulnbits import checkpoint_linear, unpack

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    base = str(Path(onnx_path).parent)

    def array(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name], base_dir=base).copy())

    checked: set[str] = set()
    with open_checkpoint(src) as ck:
        ours = {k.rpartition(".")[0] for k in ck.keys() if k.endswith(".qweight")}
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            names = _our_names(node.input[1].split(".MatMulNBits.")[0])
            missing = [n for n in names if n not in ours]
            if missing:
                raise QuantizationError(
                    f"{onnx_path}: MatMulNBits node {node.name} quantizes {', '.join(missing)}, which the checkpoint "
                    f"{src} holds in float: the exporter re-quantized it with its own rounding. Exclude it from the "
                    "export or quantize it in the quantize stage."
                )
            zp = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            got = unpack(array(node.input[1]), array(node.input[2]), zp, attrs["K"], attrs["N"], attrs["block_size"],
                         attrs.get("bits", 4))
            want = [checkpoint_linear(fmt, ck.get_prefix(n), quant_config) for n in names]
            w_int = torch.cat([w.w_int for w in want])
            zeros = torch.cat([w.zeros for w in want])
            scales = torch.cat([w.scales for w in want])
            same = (got.w_int.shape == w_int.shape and torch.equal(got.w_int, w_int.to(torch.int32))
                    and torch.equal(got.zeros, zeros.to(torch.int32)) and torch.equal(got.scales, scales.float()))
            if not same:
                raise QuantizationError(
                    f"{onnx_path}: MatMulNBits node {node.name} does not hold the checkpoint's integers, zero points "
                    f"and scales of {', '.join(names)}: the exporter changed the quantized weights. Report the "
                    "onnxruntime-genai version with this message; compile for another target meanwhile."
                )
            checked.update(names)
        if ours - checked:
            left = sorted(ours - checked)
            raise QuantizationError(
                f"{onnx_path}: {len(left)} quantized linear(s) of {src} have no MatMulNBits in the export "
                f"({', '.join(left[:3])}...): the exporter dequantized them. Compile for another target."
            )
    return len(checked)


class OnnxCausalLM:
    """``model(input_ids [B, T]) -> logits [B, T, V]`` (torch float32) through an ONNX Runtime session: one
    full-sequence pass with empty past key/values and an all-ones attention mask (no padding in evaluation)."""

    def __init__(self, session, decoder: dict, device: str):
        import torch

        self.session = session
        self.device = torch.device("cpu")  # inputs are handed over as numpy arrays on the host
        self.runs_on = device
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.inputs = {i.name: i.type for i in session.get_inputs()}

    def __call__(self, input_ids):
        import numpy as np
        import torch

        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        batch, time = ids.shape
        feeds = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((batch, time), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(time, dtype=np.int64), (batch, time)).copy()
        for name, kind in self.inputs.items():
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in kind else np.float32
                feeds[name] = np.zeros((batch, self.kv_heads, 0, self.head_size), dtype=dtype)
        (logits,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(logits).float()


def load(artifact: Path, device: str):
    """``(model, tokenizer)`` for a compile artifact of this target: an ONNX Runtime session over its model.onnx."""
    from pipeline.stages.compile import engine_model_dir, read_engine

    return _open(engine_model_dir(artifact), device, read_engine(artifact)["trust_remote_code"], artifact)


def _open(model_dir: Path, device: str, trust_remote_code: bool, where: Path):
    import onnxruntime

    from pipeline.engines.transformers_engine import load_tokenizer

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise TargetUnavailable(
                f"{where} was compiled for CUDA, but this onnxruntime has no CUDAExecutionProvider. Install "
                "onnxruntime-gpu, or compile with compile.device: cpu."
            )
        providers.insert(0, "CUDAExecutionProvider")
    decoder = json.loads((model_dir / GENAI_CONFIG).read_text())["model"]["decoder"]
    session = onnxruntime.InferenceSession(str(model_dir / decoder.get("filename", MODEL_FILE)),
                                           onnxruntime.SessionOptions(), providers=providers)
    return OnnxCausalLM(session, decoder, device), load_tokenizer(model_dir, trust_remote_code)


def check_run(artifact: Path, log) -> dict:
    """Load the artifact in ONNX Runtime and take three greedy steps from a short prompt (full recompute).
    Called by compile before engine.json exists: the device is read from genai_config.json's providers."""
    import torch

    model_dir = Path(artifact) / ARTIFACT_MODEL
    genai = (model_dir / GENAI_CONFIG).read_text()
    model, tokenizer = _open(model_dir, "cuda" if '"cuda"' in genai else "cpu", False, artifact)
    ids = torch.tensor([tokenizer.encode("def main():")]) if tokenizer is not None else torch.zeros(1, 4, dtype=torch.long)
    prompt_len = ids.shape[1]
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, prompt_len:].tolist()
    log.info("onnxruntime check run: next tokens %s", new)
    return {"generated_ids": new, "text": tokenizer.decode(new) if tokenizer is not None else None}


def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str):
    """None: ONNX Runtime (and onnxruntime-genai) ship no OpenAI-compatible server, and the embedded server has
    no generation path over this artifact yet; the serve stage records 'not served'."""
    return None
