"""The ``gguf`` target: one GGUF file that llama.cpp, llama-cpp-python and Ollama load, carrying OUR integers.

``build`` writes ``model/model.gguf`` with the ``gguf`` package's writer: a quantized linear's codes and
scales become Q4_0 (symmetric INT4), Q4_1 (asymmetric INT4, AWQ) or Q8_0 (8-bit GPTQ ``sym``, lmdeploy W8A8)
blocks by :mod:`pipeline.formats.gguf_blocks` (no re-quantization; the one rounding is Q4_1's fp16 offset and
W8A8's fp16 scale, both measured into the build metrics); float matrices keep their F16/BF16 bits (F32
otherwise), norms F32. Beside it: the tokenizer and chat template (also inside the GGUF metadata),
an Ollama ``Modelfile`` and ``gguf.json`` (serving settings). The file is read back with ``gguf.GGUFReader`` and
its tensor names, types and shapes are checked before the artifact is kept.

Measured in llama-cpp-python 0.3.36 (CPU) on the shipped tiny model, 2047 tokens of the held-out text, against
the transformers target on the same folder and tokens: perplexity 137.9332 vs 137.9320 (F16 reference),
138.2053 vs 138.1966 (RTN asymmetric, Q4_1), 137.9332 vs 137.9276 (symmetric, Q4_0): within 6e-5 relative,
KL(transformers || llama.cpp) 1e-7 / 1.3e-5 / 1.3e-5 nats per token; llama.cpp's own arithmetic (activations
quantized to 8 bits per block of 32 for quantized matmuls, fp16 activations for F16 ones) is the difference.

Read from (versions named):
- llama.cpp ``convert_hf_to_gguf.py`` / ``conversion/llama.py`` (``LlamaModel``: ``set_gguf_parameters`` adds
  ``vocab_size`` and ``rope.dimension_count = head_dim``; ``permute(weights, n_head, n_head_kv)`` reorders
  ``q_proj`` rows with ``n_head`` and ``k_proj`` rows with ``n_head_kv``, and its NVFP4 path permutes the
  per-row scales the same way, as we do with whole block rows; ``get_vocab_base``/``_set_vocab_gpt2``: tokens
  in id order, special added tokens CONTROL, ``[PAD{i}]`` UNUSED fillers, ``tokenizer.ggml.model = gpt2``,
  merges/bos/eos/chat template through ``gguf.SpecialVocab``). Note: that converter dequantizes AWQ/GPTQ to
  float and re-quantizes; this target does not.
- the ``gguf`` package 0.19.0 (``GGUFWriter``, ``get_tensor_name_map(MODEL_ARCH.LLAMA)``: ``token_embd``,
  ``blk.N.attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down|attn_norm|ffn_norm``, ``output_norm``,
  ``output``; ``SpecialVocab`` reads ``chat_template.jinja``; ``GGUFReader``).
- llama.cpp ``src/llama-vocab.cpp`` pre-tokenizer names (``gpt-2``: GPT-2's regex, ``llama-bpe``: Llama 3's).
- llama-cpp-python 0.3.36 (``Llama(model_path, logits_all=True, n_ctx, n_threads)``, ``eval``, ``scores``;
  ``python -m llama_cpp.server --model --host --port``) and llama.cpp ``tools/server`` (``llama-server -m
  --host --port --ctx-size --parallel --alias --jinja --chat-template-file``, ``LLAMA_API_KEY``, ``/health``).
- rope: default, linear (``rope.scaling``) and Llama 3.1's ``llama3`` (the ``rope_freqs`` tensor that
  ``LlamaModel.generate_extra_tensors`` writes); other rope types are refused before any work.
- Ollama's Modelfile reference (``FROM``, ``TEMPLATE`` as a Go template over ``.Messages``/``.Role``/
  ``.Content``, ``PARAMETER stop``, ``PARAMETER num_ctx``).
"""

from __future__ import annotations

import json
import logging
import shutil
import weakref
from pathlib import Path

import torch

from pipeline.errors import ModelFolderError, QuantizationError, StageError, TargetUnavailable

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
SETTINGS = "gguf.json"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # llama.cpp's 'llama' arch (convert_hf_to_gguf)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "config.json")
# tokenizer.json pre-tokenizers -> llama.cpp's tokenizer.ggml.pre (llama-vocab.cpp names)
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
MAX_EVAL_CTX = 8192  # the in-process evaluator's context cap (KV cache memory); serving uses session_len


# ------------------------------------------------------------------------------------------------ tensors


def _tensors(ctx, hp: dict, fmt, figures: dict):
    """Yields ``(gguf name, array, raw ggml type name or None)`` tensor by tensor (one linear in memory at a
    time); fills ``figures`` with the rounding measured on the way."""
    import gguf

    from pipeline.formats import awq_gemm, gguf_blocks, gptq, w8a8
    from pipeline.formats.checkpoint import open_checkpoint

    n_layers, n_head = hp["num_hidden_layers"], hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    qc = hp.get("quantization_config") or {}
    figures.update(q4_1_offset_max_abs=0.0, q4_1_offset_bound=0.0, q4_1_offset_max_steps=0.0, q8_0_scale_max_rel=0.0)
    with open_checkpoint(ctx.src, allow_pickle=ctx.allow_pickle) as ck:
        modules: dict[str, set[str]] = {}
        for key in ck.keys():
            mod, _, leaf = key.rpartition(".")
            modules.setdefault(mod, set()).add(leaf)
        for mod, leaves in modules.items():
            if mod.endswith("rotary_emb"):
                continue
            gname = names.get_name(mod + ".weight", try_suffixes=(".weight",))
            if gname is None:
                raise QuantizationError(f"{ctx.src}: tensor {mod}.* has no GGUF name in llama.cpp's llama layout; "
                                        "the checkpoint is not a plain Llama/Mistral decoder.")
            rope_heads = n_head if gname.endswith("attn_q.weight") else n_kv if gname.endswith("attn_k.weight") else 0
            t = {leaf: ck.get(f"{mod}.{leaf}") for leaf in leaves}
            what = f"{ctx.src.name}:{mod}"
            if "qweight" in t:  # AWQ GEMM or GPTQ
                if fmt.fmt == "awq":
                    qw = awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], int(qc.get("group_size", 128)))
                else:
                    qw = gptq.unpack(t, int(qc["bits"]), qc.get("checkpoint_format", "gptq"))
                kind, blocks = gguf_blocks.blocks_for(qw, what)
                if kind == "Q4_1":
                    e = gguf_blocks.q4_1_offset_error(qw)
                    figures["q4_1_offset_max_abs"] = max(figures["q4_1_offset_max_abs"], e["max_abs"])
                    figures["q4_1_offset_bound"] = max(figures["q4_1_offset_bound"], e["bound"])
                    figures["q4_1_offset_max_steps"] = max(figures["q4_1_offset_max_steps"], e["max_in_steps"])
            elif "scale" in t or "weight_scale" in t:  # W8A8 int8 per channel (lmdeploy / compressed-tensors)
                w_int8, scale = (w8a8.unpack_lmdeploy(t) if "scale" in t else w8a8.unpack_compressed_tensors(t))
                kind, blocks = "Q8_0", gguf_blocks.q8_0_blocks(w_int8, scale, None, what)
                figures["q8_0_scale_max_rel"] = max(figures["q8_0_scale_max_rel"],
                                                    gguf_blocks.q8_0_scale_error(scale)["max_rel"])
            else:
                kind, blocks = None, None
            if blocks is not None:
                if rope_heads:
                    blocks = gguf_blocks.permute_rows_for_rope(blocks, rope_heads)
                yield gname, blocks, kind
                if "bias" in t:
                    yield gname[: -len("weight")] + "bias", *_float(t["bias"], rope_heads, 1)
                continue
            for leaf, v in t.items():
                if not v.is_floating_point():
                    raise QuantizationError(f"{what}.{leaf}: an integer tensor the gguf target cannot place.")
                yield gname[: -len("weight")] + leaf, *_float(v, rope_heads, v.dim())


def _float(v: torch.Tensor, rope_heads: int, dim: int):
    """``(array, raw type or None)`` of a float tensor, exact: matrices stay F16 or BF16 (raw bytes) as stored,
    fp32 ones F32; 1-D tensors (norms, biases) F32, as convert_hf_to_gguf keeps them."""
    from pipeline.formats.gguf_blocks import permute_rows_for_rope

    if rope_heads:
        v = permute_rows_for_rope(v, rope_heads)
    v = v.contiguous()
    if dim >= 2 and v.dtype == torch.bfloat16:
        return v.view(torch.int16).numpy().view("uint8").reshape(*v.shape[:-1], -1), "BF16"
    keep16 = v.dtype == torch.float16 and dim >= 2
    return v.to(torch.float16 if keep16 else torch.float32).numpy(), None


# ------------------------------------------------------------------------------------------------ metadata


def _hparams(src: Path) -> dict:
    from pipeline.formats.checkpoint import read_config

    hp = read_config(src)
    arch = (hp.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise QuantizationError(
            f"{src}: architecture {arch} is not one the gguf target writes; supported: {', '.join(ARCHITECTURES)} "
            "(llama.cpp's 'llama' layout). Compile other architectures for the transformers or onnxruntime target."
        )
    return hp


def _add_hparams(w, hp: dict, model_name: str) -> None:
    import gguf

    n_head = hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
    w.add_name(model_name)
    w.add_context_length(hp.get("max_position_embeddings", 2048))
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", hp.get("rope_theta", 10000.0))))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype not in ("default", "llama3", None):  # llama3: the rope_freqs tensor (rope_factors)
        raise QuantizationError(
            f"rope type {rtype!r} is not written by the gguf target yet (default, linear and llama3 are); "
            "llama.cpp needs its own parameters for it. Compile this model for the transformers target."
        )
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_factors(hp: dict):
    """Llama 3.1's per-frequency rope divisors (``rope_type: llama3``) as llama.cpp's ``rope_freqs`` tensor
    (float32 [head_dim / 2]), or None for other rope types. Meta's rule: wavelengths shorter than
    ``original_max_position_embeddings / high_freq_factor`` keep their frequency, longer than ``... /
    low_freq_factor`` are divided by ``factor``, and those between are interpolated smoothly."""
    import math

    import numpy as np

    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = float(rope.get("rope_theta", hp.get("rope_theta", 10000.0)))
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings", 8192)))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json (its split regex)."""
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama-vocab.cpp: "gpt-2" -> LLAMA_VOCAB_PRE_TYPE_GPT2 ("gpt2" is the model name, not a pre)
    for p in pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []:
        if p.get("type") == "Split" and (p.get("pattern") or {}).get("Regex") == _LLAMA3_REGEX:
            return "llama-bpe"
    raise ModelFolderError(
        "the tokenizer's pre-tokenizer is not one the gguf target recognises (GPT-2 byte-level, Llama 3): llama.cpp "
        "would split text differently from the Hugging Face tokenizer. Compile for another target, or add its "
        "llama.cpp pre-tokenizer name to pipeline/engines/gguf_engine.py with a tokenization test."
    )


def _hf_tokenizer(src: Path):
    """The folder's tokenizer.json as a transformers fast tokenizer (no AutoConfig round trip)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(src)


def _add_tokenizer(w, src: Path, hp: dict, tok) -> dict:
    import gguf

    tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise ModelFolderError(f"{src}/tokenizer.json is not a BPE tokenizer; the gguf target writes BPE only.")
    pre = _pre_tokenizer(tok_json)
    vocab_size = hp["vocab_size"]
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            a = added.get(i)
            types.append(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    probe = tok("a")["input_ids"]  # what the HF tokenizer adds around text, llama.cpp must add the same
    special.add_special_token["bos"] = bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id])
    special.add_special_token["eos"] = bool(tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id])
    special.add_to_gguf(w, quiet=True)
    return {"pre": pre, "merges": len(special.merges), "special_token_ids": dict(special.special_token_ids),
            "add_bos": special.add_special_token["bos"], "chat_template": special.chat_template is not None}


# ------------------------------------------------------------------------------------------------ build


def build(ctx) -> dict:
    """Write ``model/model.gguf`` (our integers as GGUF blocks), tokenizer side files, ``Modelfile``."""
    import gguf

    from pipeline.engines.base import chat_template_text

    hp = _hparams(ctx.src)
    if not (ctx.src / "tokenizer.json").is_file():
        raise ModelFolderError(
            f"{ctx.src} has no tokenizer.json: the gguf target writes byte-level BPE tokenizers from tokenizer.json "
            "(SentencePiece tokenizer.model is not supported yet). Compile for the transformers target."
        )
    ctx.model_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.model_dir / GGUF_FILE
    # use_temp_file: each tensor goes to a spooled file as it is added, so the model never sits in memory whole
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], use_temp_file=True)
    _add_hparams(w, hp, ctx.model_name)  # first: what it refuses (rope types) is refused before any tensor work
    tok = _hf_tokenizer(ctx.src)
    tok_info = _add_tokenizer(w, ctx.src, hp, tok)
    figures: dict = {}
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, arr, kind in _tensors(ctx, hp, ctx.fmt, figures):
        w.add_tensor(name, arr, raw_dtype=getattr(gguf.GGMLQuantizationType, kind) if kind else None)
        gtype = kind or ("F16" if arr.dtype.name == "float16" else "F32")
        block, nbytes = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, gtype)]
        cols = arr.shape[-1] // nbytes * block if kind else arr.shape[-1]  # raw bytes -> elements
        expected[name] = (gtype, (*arr.shape[:-1], cols))
    factors = rope_factors(hp)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors)
        expected["rope_freqs.weight"] = ("F32", factors.shape)
    kinds = {gtype for gtype, _ in expected.values()}
    file_type = next((getattr(gguf.LlamaFileType, f"MOSTLY_{k}") for k in ("Q4_1", "Q4_0", "Q8_0", "BF16")
                      if k in kinds),
                     gguf.LlamaFileType.MOSTLY_F16 if "F16" in kinds else gguf.LlamaFileType.ALL_F32)
    w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    readback = verify_gguf(path, expected)
    for name in SIDE_FILES:
        if (ctx.src / name).is_file():
            shutil.copy2(ctx.src / name, ctx.model_dir / name)
    template = chat_template_text(ctx.src)
    if template and not (ctx.model_dir / "chat_template.jinja").is_file():
        (ctx.model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    n_ctx = ctx.cfg.session_len or hp.get("max_position_embeddings", 2048)
    settings = {"gguf": GGUF_FILE, "n_ctx": n_ctx, "parallel": min(ctx.cfg.max_batch_size, 4),
                "chat_template": "chat_template.jinja" if template else None, "model_name": ctx.model_name}
    (ctx.out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    from pipeline.engines.ollama_modelfile import write_modelfile

    modelfile = write_modelfile(ctx.model_dir, ctx.src, tok, template, n_ctx, GGUF_FILE)
    return {"model_dir": "model", "gguf": f"model/{GGUF_FILE}", "gguf_bytes": path.stat().st_size,
            "tensor_types": readback["types"], "tensors": readback["count"], "file_type": file_type.name,
            "tokenizer": tok_info, "rounding": figures, "modelfile": modelfile, "serving": settings}


def verify_gguf(path: Path, expected: dict[str, tuple[str, tuple[int, ...]]]) -> dict:
    """Read the file back with ``gguf.GGUFReader``: the same tensor names, types and [out, in] shapes."""
    import gguf

    r = gguf.GGUFReader(path)
    got = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in r.tensors}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:6]
        raise StageError(f"{path}: read back with gguf.GGUFReader, the tensors differ from those written: {diff}. "
                         "The gguf package wrote an inconsistent file; report it with the gguf version.")
    types: dict[str, int] = {}
    for t, _ in got.values():
        types[t] = types.get(t, 0) + 1
    return {"count": len(got), "types": dict(sorted(types.items()))}


# ------------------------------------------------------------------------------------------------ run


def available(device: str):
    """Runs in process with llama-cpp-python (CPU; CUDA only in a CUDA build); serving also with llama-server."""
    from pipeline.engines.base import Availability, package_present

    version = package_present("llama_cpp")
    if version == "present":  # the import name differs from the distribution's
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("llama-cpp-python")
        except PackageNotFoundError:
            pass
    server = shutil.which("llama-server")
    if device == "cuda":
        if version is None:
            return Availability(False, "llama-cpp-python is not installed (a CUDA build is needed for device cuda)")
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            return Availability(False, f"llama-cpp-python {version} was built without GPU offload")
        return Availability(True, f"llama-cpp-python {version} (GPU offload)")
    if version is not None:
        return Availability(True, f"llama-cpp-python {version} on the CPU" + (", llama-server on PATH" if server else ""))
    if server:
        return Availability(True, f"llama-server at {server} (serving; in-process evaluation needs llama-cpp-python)")
    return Availability(False, "neither llama-cpp-python (pip install llama-cpp-python) nor llama-server is installed")


class LlamaCppLM:
    """``model(input_ids [B, T]) -> logits [B, T, V]`` through llama-cpp-python, one row at a time."""

    def __init__(self, gguf_path: Path, n_ctx: int, device: str):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise TargetUnavailable(
                f"evaluating the gguf artifact in process needs llama-cpp-python, which is not importable ({e}). "
                "Install it (pip install 'quantship[test]' builds it from source), or evaluate through llama-server."
            ) from e
        self.n_ctx = n_ctx
        self.device = torch.device("cpu")
        self.llama = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                           n_threads=2, n_gpu_layers=-1 if device == "cuda" else 0, verbose=False)
        # free the model while the interpreter is whole (Llama.__del__ at shutdown finds its modules gone)
        weakref.finalize(self, self.llama.close)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        import numpy as np

        b, t = input_ids.shape
        if t > self.n_ctx:
            raise StageError(f"a window of {t} tokens exceeds the llama.cpp context of {self.n_ctx}; lower "
                             "eval.seq_len or raise compile.session_len.")
        rows = []
        for row in input_ids.tolist():
            self.llama.reset()
            self.llama.eval(row)
            rows.append(torch.from_numpy(np.array(self.llama.scores[:t], dtype=np.float32)))
        return torch.stack(rows)


def load(artifact: Path, device: str):
    """``(model, tokenizer)``: llama.cpp logits and the HF tokenizer from the artifact (identical eval tokens)."""
    from pipeline.engines.transformers_engine import load_tokenizer

    artifact = Path(artifact)
    settings = json.loads((artifact / SETTINGS).read_text())
    model = LlamaCppLM(artifact / "model" / settings["gguf"], min(settings["n_ctx"], MAX_EVAL_CTX), device)
    return model, load_tokenizer(artifact / "model")


def check_run(artifact: Path, log) -> dict:
    """Load in llama.cpp, compare its tokenizer with the HF one on a sample, generate a few tokens greedily."""
    from importlib.metadata import version

    model, tok = load(artifact, "cpu")
    text = "def sort(items):\n    return sorted(items, key=len)  # Python's list.sort() is stable.\n"
    hf_ids = tok(text, add_special_tokens=True)["input_ids"]
    add_bos = model.llama.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    cpp_ids = model.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    out = model.llama.create_completion(text, max_tokens=4, temperature=0.0)
    agrees = hf_ids == cpp_ids
    if not agrees:
        log.warning("llama.cpp tokenizes the sample differently from the Hugging Face tokenizer (%d vs %d tokens)",
                    len(cpp_ids), len(hf_ids))
    return {"llama_cpp_python": version("llama_cpp_python"), "tokenizer_agrees": agrees,
            "generated": out["choices"][0]["text"]}


def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str):
    """``llama-server`` when on PATH, else llama-cpp-python's server."""
    import importlib.util
    import sys

    from pipeline.engines.base import ServeCommand

    artifact = Path(artifact)
    s = json.loads((artifact / SETTINGS).read_text())
    model_dir = artifact / "model"
    gguf_path = str(model_dir / s["gguf"])
    server = shutil.which("llama-server")
    env = {}
    if server:
        argv = [server, "-m", gguf_path, "--host", host, "--port", str(port), "--ctx-size",
                str(s["n_ctx"] * s["parallel"]), "--parallel", str(s["parallel"]), "--alias", model_name, "--jinja"]
        if s.get("chat_template"):
            argv += ["--chat-template-file", str(model_dir / s["chat_template"])]
        if api_key:
            env["LLAMA_API_KEY"] = api_key  # llama.cpp common/arg.cpp: --api-key reads LLAMA_API_KEY
        return ServeCommand(argv, f"http://{host}:{port}", "/health", env, model_name)
    missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise TargetUnavailable(
            f"serving the gguf artifact needs llama-server on PATH or llama-cpp-python's server, but "
            f"{', '.join(missing)} is not installed. pip install 'llama-cpp-python[server]' (or put llama.cpp's "
            "llama-server on PATH), then serve again."
        )
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--host", host, "--port", str(port),
            "--n_ctx", str(s["n_ctx"]), "--model_alias", model_name]
    if api_key:
        env["API_KEY"] = api_key  # llama_cpp.server ServerSettings (pydantic-settings) reads api_key from the env
    return ServeCommand(argv, f"http://{host}:{port}", "/v1/models", env, model_name)
