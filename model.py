"""model.py: VG-LLM (Qwen2.5-VL + VGGT-1B geometry features) for rft3d, from scratch around transformers.

What flows through this file (DESIGN.md section 5):

    frames uint8 [S,H,W,3] --preprocess--> Qwen patches + VGGT pixels
        --encode (frozen, no grad, once per sample)--> Encoding(vision embeds per frame, VGGT layer -2 patch tokens)
        --image_embeds (trainable merger, THE fusion point)--> per-frame [T_i, d] = vision + merger(geometry)
        --forward / generate--> scattered into the <|image_pad|> positions of Qwen2.5-VL through transformers'
                                `mm_encoder_outputs` seam, with image_grid_thw + mm_token_type_ids for 3D M-RoPE.

Sections:
    1. configs (tiny / real)            5. VGLLM: encode, fusion, prompts, forward (chunked log-probs), generate
    2. tiny tokenizer                      (5e-5f: our decode loop: shared prefill, static KV cache, CUDA graphs)
    3. frame preprocessing              6. the policy's distribution: suppressed tokens, sampling, chunked log-probs
    4. geometry merger                  7. LoRA

Beside it: vggt.py is the geometry encoder (VGGT's aggregator; this file uses only its documented interface,
features [S, h*w, out_dim] + grid (h, w), so a fork can swap it), and checkpoints.py moves weights in and out
(our saves, a Qwen2.5-VL dir + VGGT file, a VG-LLM dir). Nothing else of rft3d is imported here.
"""
import functools
import inspect
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerFast
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vggt import VGGT_1B, VGGTAggregator  # the geometry encoder (vggt.py)

# transformers 5.17 has no `mm_encoder_outputs` argument and silently drops unknown forward kwargs: the fused image
# embeddings would be ignored without an error. 5.18 is the first release with the seam (checked: 5.17 no, 5.18 yes).
if "mm_encoder_outputs" not in inspect.signature(Qwen2_5_VLModel.forward).parameters:
    import transformers
    raise ImportError("model.py needs transformers >= 5.18 (Qwen2.5-VL's mm_encoder_outputs), "
                      f"found {transformers.__version__}")

# transformers 5.24 renamed the cache argument of its forwards from `past_key_values` to `cache` (the old name is
# deprecated until 5.40); the decode loop passes its cache under whichever name this version has.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2_5_VLModel.forward).parameters else "past_key_values"

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's and VG-LLM's default system turn
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL image normalisation (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPRESSED_LOGIT = -1e9  # the logit of a never-sampled token (VGLLM.suppressed_ids): probability exactly 0
DONE_CHECK_EVERY = 8  # the decode loop asks "has every row ended?" (a host sync) once per this many tokens
_DECODE_GRAPHS = weakref.WeakKeyDictionary()  # model -> (shape key, fixed DecodeState, its CUDA graph or None)

# -----------------------------------------------------------------------------------------------------------
# 1. Configs: a plain JSON-able dict {"qwen": Qwen2_5_VLConfig.to_dict(), "vggt": hyperparameters or None, ...}
# -----------------------------------------------------------------------------------------------------------

# Qwen's special tokens in Qwen's order; the tiny tokenizer gives them ids 0..13 (real Qwen: 151643..151656).
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL_ID = 151643  # <|endoftext|> in the real Qwen2.5 vocabulary; specials are contiguous after it


def _token_fields(first_special_id, suppress_end):
    """Token ids for a vocabulary whose Qwen special tokens are contiguous from `first_special_id` in Qwen's order.
    Sampling suppresses every id in [first_special_id, suppress_end) but EOS: the special tokens and, for the real
    vocabulary, the unused embedding rows past the tokenizer (151665..151935)."""
    ids = {tok: first_special_id + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    eos = ids["<|im_end|>"]
    return dict(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                suppress_token_ids=[i for i in range(first_special_id, suppress_end) if i != eos],
                qwen_ids=dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))


def _make_config(text, vision, tokens, vggt, merger_hidden, image_width, tie=False):
    text = dict(text, bos_token_id=tokens["pad_token_id"], eos_token_id=tokens["eos_token_id"])
    qwen = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **tokens["qwen_ids"])
    return {"qwen": qwen.to_dict(), "vggt": vggt, "merger_hidden": merger_hidden if vggt else None,
            "image_width": image_width, "reference_frame": "first", "eos_token_id": tokens["eos_token_id"],
            "pad_token_id": tokens["pad_token_id"], "suppress_token_ids": tokens["suppress_token_ids"]}


def tiny_config(vocab_size, vggt=True, patch_size=7, image_size=56):
    """DESIGN section 8's toy size: text hidden 128 x 4 layers, vision depth 2 x 128, a 2-layer 64-wide VGGT.
    Patches of 7 px (Qwen and VGGT alike): a 56 px frame is an 8 x 8 grid, 16 image tokens after the 2x2 merge.
    image_size: the frame width the model sees (preprocess resizes every frame to it; 112 px: 64 tokens a frame).
    With 14 px patches it would be 4 tokens of 28 x 28 px each, too coarse to place 10 px objects (measured:
    detection F1@0.25 10.6 vs 14.9 after 600 SFT steps, README "Learning")."""
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2, patch_size=patch_size)
    tiny_vggt = dict(img_size=56, patch_size=patch_size, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                     num_register_tokens=4, patch_embed_depth=2, patch_embed_heads=4)
    return _make_config(text, vision, _token_fields(0, len(TINY_SPECIAL_TOKENS)), tiny_vggt if vggt else None,
                        merger_hidden=128, image_width=image_size)


def real_config(name, vggt=True):
    """Qwen2.5-VL-3B / 7B-Instruct (their config.json) + VGGT-1B, VG-LLM's merger (hidden 4096) and 518 px frames."""
    sizes = {"qwen2.5-vl-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie=True),
             "qwen2.5-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie=False)}
    if name not in sizes:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(sizes)}")
    text = dict(sizes[name])
    tie = text.pop("tie")
    text.update(max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=text["hidden_size"],
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    return _make_config(text, vision, _token_fields(QWEN_FIRST_SPECIAL_ID, text["vocab_size"]),
                        dict(VGGT_1B) if vggt else None, merger_hidden=4096, image_width=518, tie=tie)


def check_tokenizer(config, tokenizer):
    """The config's token ids must be the tokenizer's, or image tokens land in the wrong places."""
    q = config["qwen"]
    want = {"<|image_pad|>": q["image_token_id"], "<|video_pad|>": q["video_token_id"],
            "<|vision_start|>": q["vision_start_token_id"], "<|vision_end|>": q["vision_end_token_id"],
            "<|im_end|>": config["eos_token_id"], "<|endoftext|>": config["pad_token_id"]}
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in want}
    if got != want or tokenizer.pad_token_id != config["pad_token_id"]:
        raise ValueError(f"tokenizer and model config disagree on special token ids: config {want}, tokenizer {got} "
                         f"(pad_token_id {tokenizer.pad_token_id})")
    if len(tokenizer) > q["text_config"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {q['text_config']['vocab_size']}")

# -----------------------------------------------------------------------------------------------------------
# 2. Tiny tokenizer: byte-level BPE trained offline on the task corpus, Qwen's special tokens and chat template
# -----------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_tiny_tokenizer(corpus, vocab_size=1024):
    """Byte-level BPE where every digit, '-', '.', bracket and brace is its own token (split off before BPE), so
    numbers are spelled digit by digit while frequent JSON fragments and labels between them merge into one token.
    Special tokens get ids 0..13 in Qwen's order; pad (<|endoftext|>) != eos (<|im_end|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9\-.\[\]{}]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=TINY_SPECIAL_TOKENS, padding_side="left",
                                   chat_template=CHAT_TEMPLATE)

# -----------------------------------------------------------------------------------------------------------
# 3. Frame preprocessing (VG-LLM's, in numpy/torch: transformers' Qwen processors need torchvision)
# -----------------------------------------------------------------------------------------------------------


def preprocess(frames, config):
    """frames uint8 [S,H,W,3] -> dict(pixel_values [S*gh*gw, 3*2*14*14], image_grid_thw [S,3], vggt_images [S,3,H',W']).

    VG-LLM: resize (PIL bicubic) to `image_width` wide and a height that is a multiple of 14 (centre-crop taller
    frames to a square); VGGT sees exactly these pixels. Qwen sees the same pixels cropped at the bottom/right to an
    even patch grid (518x392 -> 504x392: 36x28 patches -> 252 tokens), CLIP-normalised, cut into 14x14 patches with
    the still frame repeated for the temporal patch of 2, in the order Qwen's 2x2 patch merger expects."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [S,H,W,3], got {frames.dtype} {frames.shape}")
    vc = config["qwen"]["vision_config"]
    p, m, tp = vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
    S, H, W, _ = frames.shape
    width = config["image_width"]
    height = round(H * (width / W) / p) * p
    if (height, width) != (H, W):
        resize = lambda f: np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
        frames = np.stack([resize(f) for f in frames])
    if height > width:  # VG-LLM's "crop" mode: portrait frames are centre-cropped to width x width
        top = (height - width) // 2
        frames, height = frames[:, top:top + width], width
    vggt_images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [S,3,H',W']
    gh, gw = (height // p) // m * m, (width // p) // m * m  # even patch grid
    x = vggt_images[:, :, :gh * p, :gw * p]
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    # [S, 3, gh/m, m, p, gw/m, m, p] -> [S, gh/m, gw/m, m, m, 3, p, p]: raster over 2x2 blocks, inner (dy, dx)
    x = x.reshape(S, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1)  # the still frame twice: [.., 3, tp, p, p]
    pixel_values = x.reshape(S * gh * gw, 3 * tp * p * p)
    image_grid_thw = torch.tensor([[1, gh, gw]] * S, dtype=torch.long)
    return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw, "vggt_images": vggt_images}

# -----------------------------------------------------------------------------------------------------------
# 4. Geometry merger (VG-LLM's `merger.*`): RMSNorm -> 2x2 grouping as Qwen's patch merger -> MLP to d_model
# -----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def group_2x2(x, h, w, m=2):
    """[S, h*w, C] raster-ordered patch features -> [S * (h//m) * (w//m), m*m*C]: odd grids cropped to even,
    merged tokens in raster order over the merged grid, each concatenating its m x m patches in (dy, dx) order."""
    S, _, C = x.shape
    hm, wm = h // m, w // m
    x = x.view(S, h, w, C)[:, :hm * m, :wm * m]
    return x.reshape(S, hm, m, wm, m, C).permute(0, 1, 3, 2, 4, 5).reshape(S * hm * wm, m * m * C)


class GeometryMerger(nn.Module):
    def __init__(self, in_dim, hidden, out_dim, merge=2):
        super().__init__()
        self.merge = merge
        self.ln_q = RMSNorm(in_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merge * merge * in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        for layer in (self.mlp[0], self.mlp[2]):  # transformers' init for Qwen linears (initializer_range 0.02)
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x, h, w):  # x [S, h*w, 2C] -> [S * (h//2) * (w//2), d_model]
        return self.mlp(group_2x2(self.ln_q(x), h, w, self.merge))

# -----------------------------------------------------------------------------------------------------------
# 5. VGLLM
# -----------------------------------------------------------------------------------------------------------


@dataclass
class Encoding:
    """One sample's frozen encoder outputs, computed once and reused for G samples, reference and policy passes."""
    image_embeds: tuple  # per frame [T_i, d]: Qwen vision tower (+ its frozen 2x2 merger)
    geometry: torch.Tensor | None  # [S, h*w, 2C]: VGGT layer -2 patch tokens, or None without the geometry branch
    geometry_hw: tuple | None  # VGGT patch grid (h, w)
    image_grid_thw: torch.Tensor  # [S, 3] long: Qwen patch grid per frame (1, gh, gw)
    n_tokens_per_image: list  # T_i = gh * gw / 4

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return Encoding(tuple(t.to(device) for t in self.image_embeds), move(self.geometry), self.geometry_hw,
                        self.image_grid_thw.to(device), list(self.n_tokens_per_image))


class StaticKV:
    """The decode loop's KV cache: per layer keys and values [B, H_kv, L, d_head] allocated once, L = prompt + new
    tokens, starting from the prefill's [B, H_kv, P, d_head]. transformers' attention calls update(k, v, layer_idx) with
    one position per row; it is written in place at `slot` and attention runs over all L slots, the additive mask
    hiding the empty ones and the left padding."""

    def __init__(self, keys, values, length, slot):
        grow = lambda t: F.pad(t, (0, 0, 0, length - t.shape[2]))  # [B, H_kv, P, d] -> [B, H_kv, L, d], zeros after P
        self.keys, self.values = [grow(k) for k in keys], [grow(v) for v in values]
        self.slot = torch.tensor([slot], device=keys[0].device)  # [1] long: where this step's keys/values go

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class DecodeState:
    """Everything a decoding step reads and writes, on the device. B rows, C = max_new_tokens, L cache slots."""
    hidden: torch.Tensor  # [B, d] the prefill's last prompt position (picks the first token)
    kv: StaticKV
    mask: torch.Tensor  # [B, 1, 1, L] additive attention mask: 0 on the prompt and on the tokens fed so far
    cos: torch.Tensor  # [B, C, d_head] rotary angles of the new positions
    sin: torch.Tensor
    slot: torch.Tensor  # [1] long: the cache slot of the token fed in this step (P at the first step) = kv.slot
    step: torch.Tensor  # [1] long: its completion column (then the column the next token is written to)
    token: torch.Tensor  # [B] long: the last token picked
    finished: torch.Tensor  # [B] bool: EOS emitted
    completion: torch.Tensor  # [B, C] long, pad_token_id where nothing was written
    logp: torch.Tensor | None  # [B, C] float32: the sampler's log-prob of each token (return_logprobs only)
    suppress: torch.Tensor  # [n] long: suppressed_ids
    temperature: float
    do_sample: bool

    def tensors(self):  # the buffers a CUDA graph of the step reads and writes
        return [*self.kv.keys, *self.kv.values, self.mask, self.cos, self.sin, self.slot, self.step, self.token,
                self.finished, self.completion, self.suppress] + ([self.logp] if self.logp is not None else [])


def _all_ranks_done(finished, synced_gpus):
    """Has every row ended (on every rank, under FSDP's lock-step)? The only host sync inside the token loop."""
    done = finished.all().int()
    if synced_gpus and dist.is_available() and dist.is_initialized():
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done)


class VGLLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config["qwen"]))
        if self.tied:  # Qwen2.5-VL-3B shares input and output embeddings (not tied by transformers on meta)
            self.qwen.lm_head.weight = self.qwen.model.language_model.embed_tokens.weight
        self.vggt = self.merger = None
        if config.get("vggt"):
            self.vggt = VGGTAggregator(**config["vggt"])
            d_model = config["qwen"]["text_config"]["hidden_size"]
            self.merger = GeometryMerger(self.vggt.out_dim, config["merger_hidden"], d_model,
                                         config["qwen"]["vision_config"]["spatial_merge_size"])
            self.vggt.requires_grad_(False)
        self.qwen.model.visual.requires_grad_(False)  # frozen: Qwen vision tower and its merger, VGGT
        self.train()

    def train(self, mode=True):  # frozen encoders stay in eval mode
        super().train(mode)
        self.qwen.model.visual.eval()
        if self.vggt is not None:
            self.vggt.eval()
        return self

    @property
    def tied(self):  # one matrix for the input embedding and the output head (Qwen2.5-VL-3B)
        return bool(self.config["qwen"].get("tie_word_embeddings", False))

    @property
    def device(self):
        return self.qwen.lm_head.weight.device

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self):
        """(llm_params, merger_params) for separate learning rates (VG-LLM: 5e-6 LLM, 1e-5 merger)."""
        llm = [p for p in self.qwen.parameters() if p.requires_grad]
        merger = [p for p in self.merger.parameters() if p.requires_grad] if self.merger is not None else []
        return llm, merger

    def enable_gradient_checkpointing(self):
        self.qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # 5a. frozen encoders, once per sample -----------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames):
        """frames: list (one per sample) of uint8 [S,H,W,3] -> list of Encoding. Vision tower over all frames of all
        samples in one call; VGGT per sample (all its frames together, the reference frame first)."""
        visual = self.qwen.model.visual
        inputs = [preprocess(f, self.config) for f in frames]
        pixels = torch.cat([x["pixel_values"] for x in inputs]).to(self.device, visual.dtype)
        grids = torch.cat([x["image_grid_thw"] for x in inputs]).to(self.device)
        vision = self.qwen.model.get_image_features(pixels, grids).pooler_output  # tuple of [T_i, d]
        merge = self.config["qwen"]["vision_config"]["spatial_merge_size"]
        encodings, i = [], 0
        for x in inputs:
            grid = x["image_grid_thw"].to(self.device)
            S = len(grid)
            geometry = hw = None
            if self.vggt is not None:
                images = x["vggt_images"].to(self.device)  # [S, 3, H', W']
                flip = self.config.get("reference_frame", "first") == "last"  # VG-LLM's option: last frame as reference
                geometry, hw = self.vggt.features(images.flip(0) if flip else images)  # [S, h*w, 2C], (h, w)
                geometry = geometry.flip(0) if flip else geometry
            n_tokens = (grid.prod(-1) // merge ** 2).tolist()
            encodings.append(Encoding(tuple(vision[i:i + S]), geometry, hw, grid, n_tokens))
            i += S
        return encodings

    # 5b. THE fusion point ---------------------------------------------------------------------------------

    def image_embeds(self, encodings):
        """Per-image fused embeddings (vision + merger(geometry)), in batch-row order. The merger is trainable, the
        encoder outputs are constants. An Encoding repeated G times is merged once and reused (same values and
        gradients as G separate encodings, less work)."""
        fused, out = {}, []
        dtype = self.qwen.lm_head.weight.dtype
        for enc in encodings:
            if id(enc) not in fused:
                embeds = tuple(e.to(dtype) for e in enc.image_embeds)
                if self.merger is not None and enc.geometry is not None:
                    geometry = self.merger(enc.geometry.to(self.merger.ln_q.weight.dtype), *enc.geometry_hw)
                    embeds = tuple(e + g.to(dtype) for e, g in zip(embeds, geometry.split(enc.n_tokens_per_image)))
                fused[id(enc)] = embeds
            out.extend(fused[id(enc)])
        return tuple(out)

    def _mm_inputs(self, image_grid_thw, encodings):
        """Keyword arguments of transformers' seam: precomputed per-image embeddings instead of pixel_values."""
        if not encodings:
            return {}
        if image_grid_thw is None:
            image_grid_thw = torch.cat([e.image_grid_thw for e in encodings])
        embeds = BaseModelOutputWithPooling(pooler_output=self.image_embeds(encodings))
        return {"image_grid_thw": image_grid_thw.to(self.device), "mm_encoder_outputs": {"image": embeds}}

    # 5c. prompts ------------------------------------------------------------------------------------------

    def prompt_batch(self, tokenizer, prompts, encodings):
        """Chat-templated, left-padded prompts with each "<image>" expanded to <|vision_start|> <|image_pad|> x T_i
        <|vision_end|>. Nothing is ever truncated. Returns input_ids, attention_mask, mm_token_type_ids [B,P] and
        image_grid_thw [N_images,3] (CPU tensors)."""
        check_tokenizer(self.config, tokenizer)
        q = self.config["qwen"]
        start, pad_img, end = q["vision_start_token_id"], q["image_token_id"], q["vision_end_token_id"]
        rows = []
        for b, (text, enc) in enumerate(zip(prompts, encodings, strict=True)):
            n = text.count(IMAGE_PLACEHOLDER)
            if n != len(enc.n_tokens_per_image):
                raise ValueError(f"prompt {b} has {n} {IMAGE_PLACEHOLDER} placeholders but its sample has "
                                 f"{len(enc.n_tokens_per_image)} frames")
            chat = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                                  {"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
            ids, types = [], []
            for i, piece in enumerate(chat.split(IMAGE_PLACEHOLDER)):
                if i > 0:  # the vision block of frame i-1
                    T = enc.n_tokens_per_image[i - 1]
                    ids += [start] + [pad_img] * T + [end]
                    types += [0] + [1] * T + [0]
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                types += [0] * len(piece_ids)
            rows.append((ids, types))
        P = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), P), self.config["pad_token_id"], dtype=torch.long)
        attention_mask = torch.zeros(len(rows), P, dtype=torch.long)
        mm_token_type_ids = torch.zeros(len(rows), P, dtype=torch.long)
        for b, (ids, types) in enumerate(rows):  # left padding
            input_ids[b, P - len(ids):] = torch.tensor(ids)
            attention_mask[b, P - len(ids):] = 1
            mm_token_type_ids[b, P - len(ids):] = torch.tensor(types)
        image_grid_thw = torch.cat([e.image_grid_thw.cpu() for e in encodings]) if encodings else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
                "image_grid_thw": image_grid_thw}

    # 5d. per-token log-probs (one call of the root module: FSDP2 wraps the root) ---------------------------

    def forward(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, encodings, temperature=1.0,
                return_entropy=False, chunk_size=512, first_position=0):
        """logp [B, L-1] with logp[b,t] = log softmax(logits[b,t] / temperature)[input_ids[b,t+1]] (+ entropy
        [B, L-1] of the same tempered distribution, no grad). Positions t < first_position are skipped (left 0):
        pass the prompt length - 1 to avoid computing prompt log-probs nobody uses."""
        out = self.qwen.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                              use_cache=False, **self._mm_inputs(image_grid_thw, encodings))
        hidden = out.last_hidden_state[:, first_position:-1]  # the positions that predict a next token
        # Score the distribution generate() samples from: the same temperature and the same suppressed tokens.
        logp, entropy = token_logprobs(hidden, self.qwen.lm_head, input_ids[:, first_position + 1:], temperature,
                                       chunk_size, return_entropy, self.suppressed_ids(hidden.device))
        if first_position > 0:
            logp = F.pad(logp, (first_position, 0))
            entropy = F.pad(entropy, (first_position, 0)) if return_entropy else None
        return (logp, entropy) if return_entropy else logp

    # 5e. sampling: generate() is our own decode loop (5f); hf_generate() is transformers' generate ------------------
    #
    # transformers' generate spends most of a decoding step on the host: logits processors (the suppress-tokens isin),
    # a cache that grows by concatenation, position and mask bookkeeping, and a stopping check that syncs every token.
    # generate() keeps the loop on the device: the suppressed tokens are one precomputed index tensor, filled by the
    # same policy_logits that forward() scores with, EOS bookkeeping is a tensor, keys/values go into a cache allocated
    # once, and the host looks at a tensor value only every DONE_CHECK_EVERY steps. The two give the same greedy
    # tokens (tests/test_decode.py).

    # CUDA graphs of the decoding step: "auto" = on a CUDA device unless FSDP shards the model (its per-layer
    # all-gathers cannot be captured); True / False force it. A graph reads the parameters in place: optimiser steps
    # and load_state_dict are seen by later replays, and new parameter tensors (apply_lora) make a new recording.
    decode_cuda_graphs = "auto"

    def suppressed_ids(self, device=None):
        """[n] long: the tokens that are never sampled (vision and special tokens but EOS, unused vocabulary rows).
        generate() and forward() both pass them to policy_logits, which sets their logits to SUPPRESSED_LOGIT: one
        definition, so the sampler and the scorer are one distribution. Built once per call, not per token."""
        return torch.tensor(self.config["suppress_token_ids"], dtype=torch.long, device=device)

    def generation_config(self, max_new_tokens, temperature=1.0, do_sample=True):
        """transformers' generate settings for hf_generate: plain sampling at `temperature`, top_p 1 and top_k 0
        (transformers' default top_k is 50), no repetition penalty, the same suppressed tokens as suppressed_ids."""
        sampling = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else {}  # greedy: argmax
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=1.0,
                                eos_token_id=self.config["eos_token_id"], pad_token_id=self.config["pad_token_id"],
                                suppress_tokens=self.config["suppress_token_ids"], use_cache=True, **sampling)

    @torch.no_grad()
    def hf_generate(self, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True, synced_gpus=False):
        """transformers' own generate on the same inputs, same output contract as generate(): the reference that
        tests/test_decode.py checks generate() against and bench.py times it against."""
        P = batch["input_ids"].shape[1]
        out = self.qwen.generate(input_ids=batch["input_ids"].to(self.device),
                                 attention_mask=batch["attention_mask"].to(self.device),
                                 mm_token_type_ids=batch["mm_token_type_ids"].to(self.device),
                                 generation_config=self.generation_config(max_new_tokens, temperature, do_sample),
                                 synced_gpus=synced_gpus, **self._mm_inputs(batch.get("image_grid_thw"), encodings))
        completion = out[:, P:]
        is_eos = completion == self.config["eos_token_id"]
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        return completion.masked_fill(after_eos, self.config["pad_token_id"])

    @torch.no_grad()
    def generate(self, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True, synced_gpus=False,
                 return_logprobs=False):
        """Completion ids [B, C], C <= max_new_tokens: new tokens only, pad_token_id after the first EOS, and C where
        the last row ended (as transformers' generate). Samples policy_logits (logits / temperature, suppressed tokens at
        SUPPRESSED_LOGIT), forward()'s distribution, with top_p 1 and top_k 0; do_sample=False is greedy. For group sampling
        repeat the batch rows and the encodings list G times: nothing is re-encoded, each distinct prompt is prefilled
        once. synced_gpus (FSDP): all ranks stop at the same step. return_logprobs: also the sampler's own log-prob of
        each token [B, C] (the tests compare it with forward())."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # inference_mode: no autograd bookkeeping at all (a third less host time per small op than no_grad on the
        # tiny CPU default). Not under FSDP (synced_gpus): its unsharded parameters must stay ordinary tensors.
        with torch.inference_mode(not synced_gpus):
            completion, logp = self._decode(batch, encodings, max_new_tokens, temperature if do_sample else 1.0,
                                            do_sample, synced_gpus, return_logprobs)
        # copies, made outside inference mode: ordinary tensors for the caller (the scoring forward embeds them),
        # and the CUDA-graph path reuses its buffers
        return (completion.clone(), logp.clone()) if return_logprobs else completion.clone()

    def _decode(self, batch, encodings, max_new_tokens, temperature, do_sample, synced_gpus, return_logprobs):
        graphs = self.decode_cuda_graphs
        if graphs == "auto":
            graphs = self.device.type == "cuda" and not synced_gpus and not isinstance(self, FSDPModule)
        # 1. Prefill: the prompt's keys/values into a cache of P + C slots, the first token from its last position.
        s = self._prefill(batch, encodings, max_new_tokens, temperature, do_sample, return_logprobs, graphs)
        self._pick(s, s.hidden)
        # 2. One decoding step per token, the same device work every step. The host reads a tensor value only every
        #    DONE_CHECK_EVERY steps (one sync per k tokens, at most k - 1 steps wasted after the last row ended).
        step = self._step_graph(s) if graphs and max_new_tokens > 1 else functools.partial(self._decode_step, s)
        for t in range(1, max_new_tokens):
            step()
            if t % DONE_CHECK_EVERY == 0 and _all_ranks_done(s.finished, synced_gpus):
                break
        # 3. Cut where the last row ended: its first EOS, or max_new_tokens if a row never ended.
        is_eos = s.completion == self.config["eos_token_id"]
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new_tokens)
        C = int(ends.max())
        return s.completion[:, :C], (s.logp[:, :C] if return_logprobs else None)

    # 5f. the decode loop: one prefill through transformers, then one token at a time with a static KV cache ---------
    #
    # Tried first, transformers' own static cache: generate(cache_implementation="static") works through the seam and
    # gives the same greedy tokens, but on the tiny CPU default it was no faster than the dynamic cache (282-299 vs
    # 253-286 ms for 16 rows x 32 tokens) and keeps the per-token host work above; filling a StaticCache from a shared
    # prefill would mean writing its private counters. So the cache here is ours (StaticKV, 15 lines), the layers
    # are transformers' own (called one by one: FSDP's per-layer hooks and LoRA wrappers keep working). Also tried on
    # the CPU, not kept: torch.compile of the step (inductor: 129 s to compile, then 1.3x transformers' generate, less
    # than this eager loop) and our own layer arithmetic in place of transformers' layers (12-14% faster per step: not
    # worth a second copy of Qwen2's layer). On a CPU what is left of a step is transformers' layers, the same work
    # in both loops.

    def _prefill(self, batch, encodings, max_new_tokens, temperature, do_sample, return_logprobs, graphs):
        """The prompt through transformers' Qwen2.5-VL (fused image embeddings through the mm_encoder_outputs seam,
        M-RoPE positions from get_rope_index, as transformers' generate) once per distinct (encoding, prompt) row:
        GRPO repeats each prompt G times, so one prefill and G copies of its keys/values (vLLM's prefix caching does
        the same). Returns the DecodeState with the prompt in cache slots [0, P)."""
        dev = self.device
        ids, mask, types = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "mm_token_type_ids"))
        B, P = ids.shape
        C = max_new_tokens
        encs = list(encodings) or [None] * B
        rows, copy_of, seen = [], [], {}  # rows: the prefilled rows; copy_of[b]: which of them row b copies
        for b, key in enumerate(zip(map(id, encs), map(tuple, torch.cat([ids, mask, types], 1).tolist()))):
            if key not in seen:
                seen[key] = len(rows)
                rows.append(b)
            copy_of.append(seen[key])
        copy_of = torch.tensor(copy_of, device=dev)  # [B]
        mm = self._mm_inputs(None, [encs[b] for b in rows]) if encodings else {}
        positions, _ = self.qwen.model.get_rope_index(ids[rows], types[rows], mm.get("image_grid_thw"),
                                                      attention_mask=mask[rows])  # [3, U, P]
        cache = DynamicCache()
        out = self.qwen.model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions, use_cache=True,
                              **{CACHE_KWARG: cache}, **mm)
        hidden = out.last_hidden_state[copy_of, -1]  # [B, d]: the last prompt position predicts the first token

        # The decoding state. A CUDA graph replays fixed shapes: round the cache up so prompts of other lengths fit.
        L = -(-(P + C) // 256) * 256 if graphs else P + C
        kv = StaticKV([c.keys[copy_of] for c in cache.layers], [c.values[copy_of] for c in cache.layers], L, P)
        attn = torch.full((B, 1, 1, L), torch.finfo(kv.keys[0].dtype).min, dtype=kv.keys[0].dtype, device=dev)
        attn[:, 0, 0, :P].masked_fill_(mask.bool(), 0.0)  # additive mask: the prompt but its left padding
        # A generated (text) token advances all three M-RoPE axes by one from the last prompt position, as in
        # transformers' generate: the rotary angles of every new position, computed once.
        new_positions = positions[:, copy_of, -1:] + 1 + torch.arange(C, device=dev)  # [3, B, C]
        cos, sin = self.qwen.model.language_model.rotary_emb(hidden, new_positions)  # [B, C, d_head]
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)
        s = DecodeState(hidden=hidden, kv=kv, mask=attn, cos=cos, sin=sin, slot=kv.slot, step=zeros(1), token=zeros(B),
                        finished=zeros(B, dtype=torch.bool), completion=zeros(B, C) + self.config["pad_token_id"],
                        logp=zeros(B, C, dtype=torch.float32) if return_logprobs else None,
                        suppress=self.suppressed_ids(dev), temperature=temperature, do_sample=do_sample)
        return self._fixed_buffers(s) if graphs else s

    def _pick(self, s, hidden):
        """The next token of every row from its last hidden state [B, d], written to completion column s.step. Rows
        that already ended get padding."""
        z = policy_logits(hidden, self.qwen.lm_head, s.temperature, s.suppress)  # [B, V] float32
        if s.do_sample:
            token = sample(torch.softmax(z, -1), torch.rand(len(z), 1, dtype=torch.float64, device=z.device))
        else:
            token = z.argmax(-1)
        token = token.masked_fill(s.finished, self.config["pad_token_id"])
        s.completion.index_copy_(1, s.step, token[:, None])
        if s.logp is not None:
            s.logp.index_copy_(1, s.step, torch.log_softmax(z, -1).gather(1, token[:, None]))
        s.finished |= token == self.config["eos_token_id"]
        s.token.copy_(token)

    def _decode_step(self, s):
        """One token for every row, on the device and the same work every step (no host sync, no branch on a tensor
        value, fixed shapes), so it can be captured as a CUDA graph: the last token through transformers' decoder
        layers at its cache slot, then the next token from the new logits."""
        lm = self.qwen.model.language_model
        s.mask.index_fill_(3, s.slot, 0.0)  # the slot written in this step is visible from now on
        x = lm.embed_tokens(s.token)[:, None]  # [B, 1, d]
        rope = (s.cos.index_select(1, s.step), s.sin.index_select(1, s.step))  # [B, 1, d_head]
        for layer in lm.layers:
            x = layer(x, attention_mask=s.mask, position_embeddings=rope, **{CACHE_KWARG: s.kv})
        s.slot += 1
        s.step += 1
        self._pick(s, lm.norm(x)[:, 0])

    def _fixed_buffers(self, s):
        """A CUDA graph reads and writes fixed addresses: keep one DecodeState per shape (outside the module, so
        state_dict and deepcopy never see it) and copy each call's values into it."""
        key = (tuple((t.shape, t.dtype) for t in s.tensors()), s.temperature, s.do_sample,
               torch.is_autocast_enabled(s.mask.device.type),
               tuple(map(id, self.parameters())))  # new parameter tensors (apply_lora, merge_lora): record again
        kept = _DECODE_GRAPHS.get(self)
        if kept is None or kept[0] != key:
            _DECODE_GRAPHS[self] = (key, s, None)  # a new buffer set: its graph is recorded by _step_graph
            return s
        for dst, src in zip(kept[1].tensors(), s.tensors()):
            dst.copy_(src)
        kept[1].hidden = s.hidden
        return kept[1]

    def _step_graph(self, s):
        """_decode_step recorded as a CUDA graph on the fixed buffers s, once per buffer set; returns its replay: one
        launch per token instead of one per kernel. As CUDA graphs require, warm-up steps run first on a side stream;
        each is undone (the cache slot it wrote stays hidden by the restored mask). Autocast's weight cache is off
        while recording, or the graph would keep reading the weights as they were cast at capture time."""
        key, kept, graph = _DECODE_GRAPHS[self]
        assert kept is s, "_step_graph needs the buffers of _fixed_buffers"
        if graph is None:
            state = [s.mask, s.slot, s.step, s.token, s.finished, s.completion] + ([s.logp] if s.logp is not None else [])
            saved = [t.clone() for t in state]
            undo = lambda: [t.copy_(v) for t, v in zip(state, saved)]
            amp = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                       enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.autocast(**amp):
                for _ in range(3):
                    self._decode_step(s)
                    undo()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.autocast(**amp):
                self._decode_step(s)
            undo()  # recording does not run the kernels, but keep the state exactly as the prefill left it
            _DECODE_GRAPHS[self] = (key, s, graph)
        return graph.replay

# -----------------------------------------------------------------------------------------------------------
# 6. The policy's distribution: tempered logits without the suppressed tokens, sampling, and chunked per-token
#    log-probs ([B, L, V] logits, V = 151k, never exist at once, in forward or backward)
# -----------------------------------------------------------------------------------------------------------


def policy_logits(hidden, lm_head, temperature, suppress):
    """hidden [N, d] -> [N, V] float32 logits / temperature, SUPPRESSED_LOGIT at the `suppress` ids
    (VGLLM.suppressed_ids): THE distribution, sampled by generate() and scored by token_logprobs(). A fill, not an
    added bias: a suppressed logit is a constant, so no gradient flows into it. In place where autograd allows it (the
    matmul's backward needs its inputs, not its output): each extra [N, V] float32 copy would cost as much memory as
    the logits themselves."""
    z = lm_head(hidden).float().div_(temperature)
    return z if suppress is None else z.index_fill_(1, suppress, SUPPRESSED_LOGIT)


def sample(probs, u):
    """One token per row of probs [B, V] by inverse CDF: the first token whose cumulative probability exceeds
    u * total, with u [B, 1] uniform in [0, 1) (float64). One random number per row, where torch.multinomial draws one
    exponential per vocabulary entry (150k per row for Qwen, most of a tiny model's sampling time on a CPU); a fixed
    number of device ops, no host sync. A zero-probability (suppressed) token is never drawn: its CDF step is empty,
    and u * total is kept strictly below the total."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [B, V], non-decreasing
    total = cdf[:, -1:]
    x = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0]


def token_logprobs(hidden, lm_head, targets, temperature=1.0, chunk_size=512, return_entropy=False, suppress=None):
    """hidden [B, L, d], targets [B, L] -> (logp [B, L], entropy [B, L] or None) of softmax(policy_logits).

    suppress: token ids that sampling never draws (VGLLM.suppressed_ids), so scoring removes them from the softmax
    exactly as the sampler does (both through policy_logits); otherwise pi_theta would differ from the sampler by their
    probability mass. SUPPRESSED_LOGIT is a large finite negative number rather than -inf, so a masked position whose
    target is one of them (padding after EOS) has a finite logp and 0 * logp stays 0.

    Tokens are processed chunk_size at a time, each chunk under torch.utils.checkpoint: backward recomputes that
    chunk's logits instead of keeping them, so only one chunk's [chunk_size, V] logits are alive at a time. The price
    is one extra lm_head matmul per chunk in backward (~2*d*V flops per token, small next to the LLM itself)."""
    B, L, d = hidden.shape
    h, y = hidden.reshape(B * L, d), targets.reshape(B * L)

    def chunk(h_c, y_c):
        z = policy_logits(h_c, lm_head, temperature, suppress)  # [n, V] float32
        lse = torch.logsumexp(z, dim=-1)
        logp = z.gather(-1, y_c[:, None])[:, 0] - lse
        if not return_entropy:
            return logp, None
        with torch.no_grad():
            entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        return logp, entropy

    logps, entropies = [], []
    for s in range(0, B * L, chunk_size):
        if torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad):
            logp, entropy = checkpoint(chunk, h[s:s + chunk_size], y[s:s + chunk_size], use_reentrant=False)
        else:
            logp, entropy = chunk(h[s:s + chunk_size], y[s:s + chunk_size])
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view(B, L) if logps else hidden.new_zeros(B, L, dtype=torch.float32)
    entropy = (torch.cat(entropies).view(B, L) if logps else torch.zeros_like(logp)) if return_entropy else None
    return logp, entropy

# -----------------------------------------------------------------------------------------------------------
# 7. LoRA on the LLM linears (3D-RFT used LoRA for spatial reasoning)
# -----------------------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T, with B = 0 at the start (an exact no-op) and base frozen."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self):
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def apply_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Freeze the whole LLM and wrap its target linears with LoRA. The geometry merger stays trainable."""
    model.qwen.requires_grad_(False)
    for layer in model.qwen.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Fold every LoRA update into its base linear in place (the LLM stays frozen); returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(module, name, child.base)
    return model
