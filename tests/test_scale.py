"""Issue 10: streamed loading (host memory holds one tensor, not the model), the layer walker's read/write overlap
(same bytes on and off), the streaming safetensors writer/reader, and per-block peak memory figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.engines.transformers_engine import load_model
from pipeline.errors import ModelFolderError
from pipeline.formats import gptq
from pipeline.formats.checkpoint import (
    CheckpointWriter,
    open_checkpoint,
    read_safetensors_header,
    write_safetensors_stream,
)
from pipeline.quant import layerwise
from pipeline.quant.arch import arch_spec
from pipeline.quant.methods import GPTQMethod, SmoothQuantMethod
from pipeline.resources import measure, rss_bytes


def _write_model(out: Path, hidden: int, inter: int, layers: int, dtype=torch.float32) -> int:
    """A random Llama folder written tensor by tensor (never whole in memory); returns its weight bytes."""
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    specs = [(n, dtype, tuple(t.shape)) for n, t in skeleton.state_dict().items()]
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    size = write_safetensors_stream(out / "model.safetensors", specs,
                                    lambda n: (torch.randn(dict((s[0], s[2]) for s in specs)[n], generator=gen) * 0.02).to(dtype))
    config.save_pretrained(out)
    return size


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32),
        "c": torch.tensor(2.5), "d": torch.zeros(0, 4), "e": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "f": torch.randn(4, 4).to(torch.float8_e4m3fn), "g": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors_stream(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], tensors.__getitem__)
    from safetensors.torch import load_file

    theirs = load_file(str(path))  # the library reads what we wrote
    (tmp_path / "m").mkdir()
    path.rename(tmp_path / "m" / "model.safetensors")
    with open_checkpoint(tmp_path / "m") as ck:
        for k, v in tensors.items():
            ours = ck.get(k)
            assert ours.dtype == v.dtype and ours.shape == v.shape and theirs[k].dtype == v.dtype
            assert torch.equal(ours.view(torch.uint8), v.view(torch.uint8)) if v.numel() and v.dim() else True
            assert torch.equal(theirs[k].float(), v.float()) and torch.equal(ours.float(), v.float())
            assert ck.shape(k) == tuple(v.shape)


def test_streaming_writer_refuses_a_tensor_that_is_not_the_declared_one(tmp_path):
    with pytest.raises(ValueError, match="declared"):
        write_safetensors_stream(tmp_path / "x.safetensors", [("a", torch.float32, (2, 2))], lambda n: torch.zeros(3))


def test_truncated_shard_is_a_model_folder_error(tmp_path):
    _write_model(tmp_path / "m", 64, 128, 1)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with open_checkpoint(tmp_path / "m") as ck, pytest.raises(ModelFolderError, match="truncated"):
        for name in ck.keys():
            ck.get(name)
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelFolderError, match="truncated or corrupt"):
        read_safetensors_header(f)


def test_streamed_load_equals_from_pretrained(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert set(model.state_dict()) == set(ref.state_dict())
    for name, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_streamed_load_holds_one_tensor_in_host_memory_not_the_model(tmp_path):
    """Loaded onto the meta device, every tensor is read and dropped: the peak host RSS during the load is a few
    tensors (4 MiB each here), not the 150 MB model that ``from_pretrained`` would hold first."""
    model_bytes = _write_model(tmp_path / "m", hidden=512, inter=2048, layers=8)
    largest = 512 * 2048 * 4
    assert model_bytes > 30 * largest
    load_model(tmp_path / "m", device="meta")  # warm-up: imports, first-call allocations
    before = rss_bytes()
    with measure() as m:
        model, _ = load_model(tmp_path / "m", device="meta")
    assert all(p.is_meta for p in model.parameters()) and m.figures["peak_rss_how"].startswith("VmHWM")
    grew = m.figures["peak_rss_bytes"] - before
    assert grew < model_bytes / 4, (grew, model_bytes)


def test_measure_reports_the_blocks_own_peak():
    import mmap

    def touch(mib: int) -> None:  # fresh anonymous pages, resident while mapped, returned on close
        mm = mmap.mmap(-1, mib << 20)
        for off in range(0, mib << 20, 4096):
            mm[off] = 1
        mm.close()

    touch(200)  # a peak before the block
    before = rss_bytes()
    with measure() as m:
        touch(50)
    peak = m.figures["peak_rss_bytes"]
    assert before + (45 << 20) <= peak < before + (150 << 20), (before, peak)


def _walk(src: Path, out: Path, method, overlap: bool, write=None) -> dict:
    config = AutoConfig.from_pretrained(src)
    ids = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    writer = CheckpointWriter(out, max_shard_bytes=1 << 20)  # several shards: the shard writes happen mid-walk
    with open_checkpoint(src) as ck:
        stats = layerwise.quantize_layerwise(ck, config, arch_spec("LlamaForCausalLM"), ids, method,
                                             write or writer.add, batch_size=2, overlap=overlap)
    writer.close()
    return stats


@pytest.mark.parametrize("method", [
    lambda: GPTQMethod(4, 128, True, False, 0.01, 128),
    lambda: SmoothQuantMethod(0.5),
], ids=["gptq", "smoothquant"])
def test_overlap_writes_the_same_bytes_as_the_sequential_walk(tiny_llama_dir, tmp_path, method):
    off = _walk(tiny_llama_dir, tmp_path / "off", method(), overlap=False)
    on = _walk(tiny_llama_dir, tmp_path / "on", method(), overlap=True)
    assert off["overlap"] is False and on["overlap"] is True and "write_tail_seconds" in on
    files = sorted(p.name for p in (tmp_path / "off").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "on").iterdir()) and len(files) > 2
    for name in files:
        assert (tmp_path / "off" / name).read_bytes() == (tmp_path / "on" / name).read_bytes(), name
    index = json.loads((tmp_path / "on" / "model.safetensors.index.json").read_text())
    assert any(".qweight" in k for k in index["weight_map"]) if isinstance(method(), GPTQMethod) else True


def test_overlap_is_on_by_default_and_the_environment_turns_it_off(monkeypatch):
    monkeypatch.delenv("QUANTSHIP_LAYERWISE_OVERLAP", raising=False)
    assert layerwise.overlap_default() is True
    monkeypatch.setenv("QUANTSHIP_LAYERWISE_OVERLAP", "0")
    assert layerwise.overlap_default() is False


def test_overlap_a_failing_write_stops_the_walk_with_its_error(tiny_llama_dir, tmp_path):
    seen = []

    def write(name, tensor):
        seen.append(name)
        if name.startswith("model.layers.0."):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _walk(tiny_llama_dir, tmp_path / "x", GPTQMethod(4, 128, True, False, 0.01, 128), True, write)
    assert seen and not any(n.startswith("model.layers.1.") for n in seen)


def test_overlap_a_missing_layer_tensor_stops_the_walk_with_the_readers_error(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    # raised in the reader thread, re-raised in the walk (no hang, the reader's own typed error)
    with pytest.raises(ModelFolderError, match="'model.layers.1.mlp.down_proj.weight' is not in the checkpoint"):
        _walk(src, tmp_path / "x", GPTQMethod(4, 128, True, False, 0.01, 128), True)


def test_gptq_overlap_checkpoint_loads(tiny_llama_dir, tmp_path):
    from pipeline.formats.checkpoint import copy_side_files, write_config

    _walk(tiny_llama_dir, tmp_path / "q", GPTQMethod(4, 128, True, False, 0.01, 128), True)
    write_config(tiny_llama_dir, tmp_path / "q", gptq.quantization_config(4, 128, False, True))
    copy_side_files(tiny_llama_dir, tmp_path / "q")
    model, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all() and model.quantization_info["quant_method"] == "gptq"
