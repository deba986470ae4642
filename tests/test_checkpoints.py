"""checkpoints.py: save/load round trips, every released layout, damaged files named."""
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import checkpoints
import checkpoints as C
from test_model import PROMPT, full_batch, make_model


def test_checkpoint_saved_before_the_vggt_split_loads_with_identical_logits():
    """tests/fixtures/premove-micro was saved (with its logits on fixed inputs) by commit
    2a6b898, when VGGT still lived inside model.py. The same bytes must load into today's
    classes and give the same logits."""
    from safetensors.torch import load_file
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "premove-micro")
    net, tok = C.load_pretrained(fixture)
    net.eval()
    frames = np.random.RandomState(0).randint(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    enc = net.encode([frames])
    b = net.prompt_batch(tok, ["<image><image>chair 0.12"], enc)
    with torch.no_grad():
        logits = net.qwen(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          mm_token_type_ids=b["mm_token_type_ids"], use_cache=False,
                          **net.mm_inputs(b["image_grid_thw"], enc)).logits
    expected = load_file(os.path.join(fixture, "expected_logits.safetensors"))["logits"]
    torch.testing.assert_close(logits[0, -8:], expected, rtol=0, atol=1e-6)
    assert net.vggt is not None and net.merger is not None  # the geometry branch took part


def test_save_load_identical_logits(tok, cfg, frames, tmp_path):
    model = make_model(cfg)
    enc = model.encode(frames)
    _, inputs = full_batch(model, tok, enc)
    with torch.no_grad():
        ref = model(*inputs, enc)
    C.save_pretrained(model, tok, tmp_path / "one")
    C.save_pretrained(model, tok, tmp_path / "sharded", max_shard_bytes=1_000_000)
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.startswith("model-0000")]) > 1
    for d in ("one", "sharded"):
        loaded, tok2 = C.load_pretrained(tmp_path / d)
        enc2 = loaded.encode(frames)  # encoders reload too
        with torch.no_grad():
            assert torch.equal(loaded(*inputs, enc2), ref)
        assert tok2(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]
        assert not any(p.requires_grad for p in loaded.vggt.parameters())
    # tied embeddings (Qwen2.5-VL-3B style): stored once, tied again on load
    tied_cfg = json.loads(json.dumps(cfg))
    tied_cfg["qwen"]["tie_word_embeddings"] = True
    tied = make_model(tied_cfg)
    assert tied.qwen.lm_head.weight is tied.qwen.model.language_model.embed_tokens.weight
    C.save_pretrained(tied, tok, tmp_path / "tied")
    # both names, shared memory
    C.save_pretrained(tied, tok, tmp_path / "tied_sd", state_dict=tied.state_dict())
    for d in ("tied", "tied_sd"):
        loaded, _ = C.load_pretrained(tmp_path / d)
        assert loaded.qwen.lm_head.weight is loaded.qwen.model.language_model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(loaded(*inputs, enc), tied(*inputs, enc))


def to_4x_keys(qwen_state):
    """transformers 5.x Qwen2.5-VL keys -> the 4.x layout of the released checkpoints."""
    out = {}
    for k, v in qwen_state.items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[k] = v.clone()
    return out


def flat_4x_config(cfg):
    """The released (transformers 4.x) config.json layout: text fields at the
    top, mrope in rope_scaling."""
    t, v = cfg["qwen"]["text_config"], cfg["qwen"]["vision_config"]
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
            "bos_token_id", "eos_token_id")
    flat = {k: t[k] for k in keys}
    flat.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
                torch_dtype="float32", rope_theta=t["rope_parameters"]["rope_theta"],
                tie_word_embeddings=False,
                rope_scaling={"type": "mrope",
                              "mrope_section": t["rope_parameters"]["mrope_section"]},
                vision_config={k: v[k] for k in ("depth", "hidden_size", "intermediate_size",
                                                 "num_heads", "out_hidden_size", "window_size",
                                                 "fullatt_block_indexes", "tokens_per_second",
                                                 "spatial_merge_size", "temporal_patch_size",
                                                 "patch_size", "hidden_act")} | {"in_chans": 3})
    flat.update({k: cfg["qwen"][k] for k in ("image_token_id", "video_token_id",
                                             "vision_start_token_id", "vision_end_token_id")})
    return flat


def write_dir(path, config, tensors, tok):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(tensors)  # two shards + index, as released checkpoints are
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, os.path.join(path, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    tok.save_pretrained(path)


def vggt_with_heads(model):
    state = {"aggregator." + k: v.clone() for k, v in model.vggt.state_dict().items()}
    for head in ("camera_head", "point_head", "depth_head", "track_head"):
        state[f"{head}.layer.weight"] = torch.randn(3, 3)
    return state


def assert_same_weights(loaded, source, skip=("merger.",)):
    src = source.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(src)
    for k in src:
        if not k.startswith(skip):
            assert torch.equal(got[k], src[k]), k


@pytest.mark.parametrize("qwen_layout,tied", [("4.x", False), ("5.x", False), ("4.x", True)])
def test_layout_a_qwen_dir_and_vggt_file(tok, cfg, frames, tmp_path, qwen_layout, tied):
    if tied:  # Qwen2.5-VL-3B: tie_word_embeddings, no lm_head.weight in the files
        cfg = json.loads(json.dumps(cfg))
        cfg["qwen"]["tie_word_embeddings"] = True
    source = make_model(cfg, seed=1)
    qwen_state = {k: v.clone() for k, v in source.qwen.state_dict().items()
                  if not (tied and k == "lm_head.weight")}
    qwen_state = to_4x_keys(qwen_state) if qwen_layout == "4.x" else qwen_state
    write_dir(tmp_path / "qwen", flat_4x_config(cfg) | {"tie_word_embeddings": tied},
              qwen_state, tok)
    save_file(vggt_with_heads(source), str(tmp_path / "model.safetensors"))
    torch.save(vggt_with_heads(source), tmp_path / "model.pt")
    kw = dict(dtype=None, vggt_config=cfg["vggt"], merger_hidden=cfg["merger_hidden"],
              image_width=56)
    for vggt_file in ("model.safetensors", "model.pt"):
        model, tok2 = C.from_qwen_and_vggt(str(tmp_path / "qwen"), str(tmp_path / vggt_file), **kw)
        assert_same_weights(model, source)
        assert model.config["suppress_token_ids"] == cfg["suppress_token_ids"]
        assert (model.merger.mlp[0].weight.requires_grad
                and model.merger.mlp[0].weight.abs().sum() > 0)  # fresh
        model.merger.load_state_dict(source.merger.state_dict())
        enc = model.encode(frames[:1])
        _, inputs = full_batch(model, tok2, enc)
        with torch.no_grad():
            assert torch.equal(model(*inputs, enc), source(*inputs, source.encode(frames[:1])))
    # a missing tensor and an unknown tensor both raise
    missing = dict(qwen_state)
    missing.pop(sorted(missing)[3])
    write_dir(tmp_path / "missing", flat_4x_config(cfg) | {"tie_word_embeddings": tied},
              missing, tok)
    with pytest.raises(KeyError, match="1 missing"):
        C.from_qwen_and_vggt(str(tmp_path / "missing"), str(tmp_path / "model.pt"), **kw)
    extra = vggt_with_heads(source) | {"something_else.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(KeyError, match="1 unexpected"):
        C.from_qwen_and_vggt(str(tmp_path / "qwen"), str(tmp_path / "extra.safetensors"), **kw)


def test_layout_b_vgllm_dir(tok, cfg, frames, tmp_path):
    source = make_model(cfg, seed=2)
    state = to_4x_keys(source.qwen.state_dict())
    state |= {"vggt.aggregator." + k: v.clone() for k, v in source.vggt.state_dict().items()}
    state |= {"vggt.depth_head.proj.weight": torch.randn(4, 4),
              "vggt.point_head.proj.weight": torch.randn(4, 4)}
    state |= {"merger." + k: v.clone() for k, v in source.merger.state_dict().items()}
    config = flat_4x_config(cfg) | {"use_vggt_feature": True,
                                    "vggt_merger_hidden_dim": cfg["merger_hidden"],
                                    "reference_frame": "first"}
    write_dir(tmp_path / "vgllm", config, state, tok)
    model, tok2 = C.from_vgllm(str(tmp_path / "vgllm"), dtype=None, vggt_config=cfg["vggt"],
                               image_width=56)
    assert_same_weights(model, source, skip=())
    enc = model.encode(frames)
    _, inputs = full_batch(model, tok2, enc)
    with torch.no_grad():
        assert torch.equal(model(*inputs, enc), source(*inputs, source.encode(frames)))
    state.pop("merger.mlp.2.bias")
    write_dir(tmp_path / "broken", config, state, tok)
    with pytest.raises(KeyError, match="merger.mlp.2.bias"):
        C.from_vgllm(str(tmp_path / "broken"), dtype=None, vggt_config=cfg["vggt"], image_width=56)


def corrupt_tensor_bytes(path, value=float("nan")):
    """Overwrite the first float32 tensor of a safetensors file with `value`, in
    place (header parsed by hand)."""
    raw = bytearray(Path(path).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name, info = next((k, v) for k, v in sorted(header.items())
                      if k != "__metadata__" and v["dtype"] == "F32")
    start, end = (8 + n + o for o in info["data_offsets"])
    raw[start:end] = struct.pack("<f", value) * ((end - start) // 4)
    Path(path).write_bytes(bytes(raw))
    return name


def test_nan_weights_are_refused_naming_the_file(tmp_path):
    net = __import__("model").VGLLM(__import__("model").tiny_config(64))
    checkpoints.save_pretrained(net, None, tmp_path)
    checkpoints.load_pretrained(tmp_path)  # intact: loads
    name = corrupt_tensor_bytes(tmp_path / "model.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match="model.safetensors") as e:
        checkpoints.load_pretrained(tmp_path)  # caught by the checksum written at save time
    assert str(tmp_path) in str(e.value) and "sha256" in str(e.value)
    # a file from elsewhere: no checksums, the finiteness check catches it
    (tmp_path / "checksums.json").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="NaN") as e:
        checkpoints.load_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value) and name in str(e.value)


def test_saved_files_get_ordinary_permissions(tmp_path):
    net = __import__("model").VGLLM(__import__("model").tiny_config(64))
    checkpoints.save_pretrained(net, None, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes
