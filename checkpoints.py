"""checkpoints.py: weights in and out of a VGLLM (model.py), in the three layouts users have
(DESIGN.md section 5):

    (a) from_qwen_and_vggt: a transformers Qwen2.5-VL directory (4.x or 5.x key names) +
        facebook/VGGT-1B's file: the paper's base model before SFT (fresh geometry merger)
    (b) from_vgllm: a released VG-LLM directory (4.x keys + `vggt.aggregator.*` + `merger.*`)
    (c) save/load_pretrained: our own saves: config.json (our dict) + safetensors (sharded above
        5 GiB) + tokenizer
    load(path): (b) or (c), whichever the directory holds

Every tensor of a file lands somewhere or is a documented ignore (VGGT's heads); anything missing
or unexpected raises. Loading never trusts bytes: a file that is missing, torn, not JSON, or holds
NaN/inf weights raises CheckpointError naming the file, and our saves carry checksums.json (sha256
of every file) that loading verifies. Large models are built with parameters on the meta device
and the checkpoint tensors assigned in place (no random init, no second copy in memory).
Safetensors everywhere; a VGGT `model.pt` is read with torch.load(weights_only=True), never an
arbitrary pickle. This is the file a fork edits to bring other weights.

Sections: 0. reading files safely   1. building a model from a state dict   2. our saves
          3. Qwen2.5-VL + VGGT, VG-LLM
"""
import contextlib
import hashlib
import json
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2_5_VLConfig

from lora import LoRALinear
from model import VGLLM, GeometryMerger, check_tokenizer
from vggt import VGGT_1B, read_checkpoint, split_checkpoint

# --------------------------------------------------------------------------------------------------
# 0. Reading files safely: every failure names the file; our saves are sealed with checksums
# --------------------------------------------------------------------------------------------------
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, damaged or holds non-finite weights. The
    message names it."""


def read_json(path):
    """A JSON file -> its value; CheckpointError naming the file when it is missing, empty or not
    JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # (json.JSONDecodeError, UnicodeDecodeError are ValueErrors)
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None


def read_tensors(path):
    """A safetensors file -> {name: tensor}; CheckpointError naming the file when it cannot be read
    or a floating tensor holds NaN/inf: damaged bytes can still parse, and a model trained from them
    is NaN from step 1."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read it as safetensors ({e})") from None
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or inf values (a damaged file?)")
    return state


def read_torch(path):
    """A torch.save file (weights_only: tensors and plain containers, never an arbitrary pickle) ->
    its value; CheckpointError naming the file when it is missing or torn."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch: RuntimeError (torn zip), EOFError, UnpicklingError, OSError...
        raise CheckpointError(f"{path}: cannot read it with torch.load "
                              f"({type(e).__name__}: {e})") from None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def seal(directory):
    """Finish a saved directory: its files get ordinary permissions (safetensors writes 0600; we
    want what the user's umask gives, e.g. 0644) and checksums.json lists the sha256 of every other
    file in it."""
    mask = os.umask(0)
    os.umask(mask)
    names = sorted(n for n in os.listdir(directory)
                   if n != CHECKSUMS and os.path.isfile(os.path.join(directory, n)))
    for n in names:
        os.chmod(os.path.join(directory, n), 0o666 & ~mask)
    with open(os.path.join(directory, CHECKSUMS), "w") as f:
        json.dump({n: _sha256(os.path.join(directory, n)) for n in names}, f, indent=1)
    os.chmod(os.path.join(directory, CHECKSUMS), 0o666 & ~mask)


def verify(directory):
    """Every file listed in directory/checksums.json exists with that sha256, else CheckpointError
    naming it. A directory without the list (a released checkpoint, an older save) passes: loading
    still checks finiteness."""
    listing = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(listing):
        return
    digests = read_json(listing)
    if not isinstance(digests, dict):
        raise CheckpointError(f"{listing}: not a {{file: sha256}} table")
    for name, digest in digests.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {listing})")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: damaged (its sha256 differs from the one saved in "
                                  f"{listing})")


# --------------------------------------------------------------------------------------------------
# 1. Building a model from a state dict: parameters on meta, checkpoint tensors assigned, nothing
#    left over
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (no memory, no init) but real buffers:
    rotary tables and normalisation constants are not in checkpoints, they are computed in
    __init__."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        # (re-registering a meta parameter keeps it: weight tying)
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _assign(model, state, fresh=()):
    """Assign checkpoint tensors to a model built on meta. `fresh`: key prefixes that are
    initialised anew."""
    expected = set(model.state_dict())
    # tied: stored once, as the input embedding
    optional = {"qwen.lm_head.weight"} if model.tied else set()
    missing = sorted(k for k in expected - set(state) - optional if not k.startswith(tuple(fresh)))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: {len(missing)} missing "
                       f"{missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=False, assign=True)  # shapes are checked here
    if model.tied:
        model.qwen.lm_head.weight = model.qwen.model.language_model.embed_tokens.weight
    if "merger." in fresh and model.merger is not None:
        old = model.merger
        model.merger = GeometryMerger(old.ln_q.weight.shape[0], old.mlp[0].out_features,
                                      old.mlp[2].out_features,
                                      old.merge).to(model.qwen.lm_head.weight.dtype)
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta]
    if on_meta:
        raise KeyError(f"tensors left without a value: {on_meta[:8]}")
    return model


def _build(config, state, dtype=None, fresh=()):
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with _parameters_on_meta():
        model = VGLLM(config)
    return _assign(model, state, fresh)


def _read_safetensors(path):
    """A file, or a directory with model.safetensors or a sharded model.safetensors.index.json."""
    if os.path.isfile(path):
        return read_tensors(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        state = {}
        for name in sorted(set(weight_map.values())):
            state.update(read_tensors(os.path.join(path, name)))
        return state
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json in it")
    return read_tensors(single)


# --------------------------------------------------------------------------------------------------
# 2. Our saves: what train.py writes (LoRA merged, tied head once) and reads back
# --------------------------------------------------------------------------------------------------


def _full_state_dict(model, state=None):
    """What gets saved: LoRA merged into plain weights (W + scale * B A under the plain key), the
    tied lm_head stored once, DTensors gathered. `state`: an already gathered full state dict of
    `model` (FSDP2 / DDP)."""
    state = dict(model.state_dict() if state is None else state)
    # (full_tensor is a collective)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            A, B, W = (state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B"),
                       state.pop(f"{name}.base.weight"))
            state[f"{name}.weight"] = (W.float()
                                       + module.scale * (B.float() @ A.float())).to(W.dtype)
            if f"{name}.base.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    if model.tied:
        state.pop("qwen.lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_pretrained(model, tokenizer, out_dir, max_shard_bytes=5 * 2 ** 30, state_dict=None):
    """config.json (our dict) + safetensors (sharded HF-style above max_shard_bytes) + tokenizer
    files. LoRA is merged on save (the model itself is left as it is). Under FSDP pass state_dict=
    a full state dict gathered on every rank (e.g. torch.distributed.checkpoint's
    get_model_state_dict) and call on one rank."""
    os.makedirs(out_dir, exist_ok=True)
    state = _full_state_dict(model, state_dict)
    shards, size = [{}], 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    seal(out_dir)


def load_pretrained(path, dtype=None):
    """Layout (c), our own saves -> (model, tokenizer or None). Checksums verified first (when the
    save has them); any failure is a CheckpointError naming the file or directory."""
    verify(path)
    config = read_json(os.path.join(path, "config.json"))
    tokenizer = None
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # tokenizers / transformers raise many types on a damaged file
            raise CheckpointError(f"{path}: cannot load its tokenizer "
                                  f"({type(e).__name__}: {e})") from None
        _check_tokenizer(path, config, tokenizer)
    try:
        model = _build(config, _read_safetensors(path), dtype)
    except (KeyError, TypeError, RuntimeError) as e:  # keys, config fields or shapes that don't fit
        raise CheckpointError(f"{path}: the weights do not fit the model in its config.json "
                              f"({e})") from None
    return model, tokenizer


def _check_tokenizer(path, config, tokenizer):
    """model.check_tokenizer before any weight is read; a mismatch is a CheckpointError."""
    try:
        check_tokenizer(config, tokenizer)  # the ids prompts are built with
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# 3. Released weights: a Qwen2.5-VL directory + the VGGT-1B file, or a VG-LLM directory
# --------------------------------------------------------------------------------------------------


def _qwen_key(k):
    """transformers 4.x (model.*, visual.*, lm_head.*) or 5.x (model.language_model.*,
    model.visual.*) -> ours."""
    if k.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return "qwen." + k
    if k.startswith("visual."):
        return "qwen.model." + k
    if k.startswith("model."):
        return "qwen.model.language_model." + k[len("model."):]
    return "unexpected." + k  # reported as unexpected by _assign


def _qwen_dir_config(path, tokenizer, vggt, merger_hidden, image_width):
    """Our config dict for a Qwen2.5-VL / VG-LLM directory; token ids and the suppress list from
    its tokenizer."""
    raw = read_json(os.path.join(path, "config.json"))
    flags = {k: raw.pop(k) for k in ("use_vggt_feature", "vggt_merger_hidden_dim",
                                     "reference_frame") if k in raw}
    # 4.x flat configs (rope_scaling "mrope") are converted here
    qwen = Qwen2_5_VLConfig(**raw).to_dict()
    vocab = qwen["text_config"]["vocab_size"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    suppress = sorted((specials | set(range(len(tokenizer), vocab))) - {eos})
    config = {"qwen": qwen, "vggt": vggt, "merger_hidden": merger_hidden if vggt else None,
              "image_width": image_width,
              "reference_frame": flags.get("reference_frame", "first"), "eos_token_id": eos,
              "pad_token_id": pad, "suppress_token_ids": suppress}
    return config


def from_qwen_and_vggt(qwen_dir, vggt_file, dtype=torch.bfloat16, vggt_config=None,
                       merger_hidden=4096, image_width=518):
    """Layout (a): a transformers Qwen2.5-VL directory (4.x or 5.x keys) + VGGT-1B weights
    (`aggregator.*` used, heads ignored; vggt_file=None turns the geometry branch off). The merger
    is freshly initialised. Returns (model, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    vggt = (vggt_config or dict(VGGT_1B)) if vggt_file else None
    config = _qwen_dir_config(qwen_dir, tokenizer, vggt, merger_hidden, image_width)
    _check_tokenizer(qwen_dir, config, tokenizer)
    state = {_qwen_key(k): v for k, v in _read_safetensors(qwen_dir).items()}
    ignored = []
    if vggt_file:
        aggregator, ignored, unexpected = split_checkpoint(read_checkpoint(vggt_file))
        state.update({"vggt." + k: v for k, v in aggregator.items()})
        state.update({"unexpected." + k: v for k, v in unexpected.items()})  # reported by _assign
    model = _build(config, state, dtype, fresh=("merger.",))
    print(f"from_qwen_and_vggt: {len(state)} tensors loaded, {len(ignored)} VGGT head tensors "
          "ignored, merger fresh")
    return model, tokenizer


def from_vgllm(path, dtype=torch.bfloat16, vggt_config=None, image_width=518):
    """Layout (b): a VG-LLM checkpoint directory (4.x keys + `vggt.aggregator.*`, ignored
    `vggt.*_head.*`, `merger.*`; config flags use_vggt_feature, vggt_merger_hidden_dim,
    reference_frame). Returns (model, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = read_json(os.path.join(path, "config.json"))
    use_vggt = raw.get("use_vggt_feature", False)
    vggt = (vggt_config or dict(VGGT_1B)) if use_vggt else None
    config = _qwen_dir_config(path, tokenizer, vggt, raw.get("vggt_merger_hidden_dim", 4096),
                              image_width)
    _check_tokenizer(path, config, tokenizer)
    state, vggt_state = {}, {}
    for k, v in _read_safetensors(path).items():
        if k.startswith("vggt."):
            vggt_state[k[len("vggt."):]] = v
        elif k.startswith("merger."):
            state[k] = v
        else:
            state[_qwen_key(k)] = v
    aggregator, ignored, unexpected = split_checkpoint(vggt_state)
    state.update({"vggt." + k: v for k, v in aggregator.items()})
    state.update({"unexpected.vggt." + k: v for k, v in unexpected.items()})  # reported by _assign
    model = _build(config, state, dtype)
    print(f"from_vgllm: {len(state)} tensors loaded, {len(ignored)} VGGT head tensors ignored")
    return model, tokenizer


def load(path, dtype=None):
    """A model directory, ours (c) or VG-LLM's (b), told apart by its config.json -> (model,
    tokenizer). What train.py and eval.py load with."""
    if "use_vggt_feature" in read_json(os.path.join(path, "config.json")):
        return from_vgllm(path, dtype)
    return load_pretrained(path, dtype)
