"""model.py: VG-LLM (Qwen2.5-VL + VGGT-1B geometry features) for rft3d, from scratch around transformers.

What flows through this file (DESIGN.md section 5):

    frames uint8 [S,H,W,3] --preprocess--> Qwen patches + VGGT pixels
        --encode (frozen, no grad, once per sample)--> Encoding(vision embeds per frame, VGGT layer -2 patch tokens)
        --image_embeds (trainable merger, THE fusion point)--> per-frame [T_i, d] = vision + merger(geometry)
        --forward / generate--> scattered into the <|image_pad|> positions of Qwen2.5-VL through transformers'
                                `mm_encoder_outputs` seam, with image_grid_thw + mm_token_type_ids for 3D M-RoPE.

Sections:
    1. configs (tiny / real)            6. VGLLM: encode, fusion, prompts, forward (chunked log-probs), generate
    2. tiny tokenizer                   7. chunked per-token log-probs
    3. frame preprocessing              8. LoRA
    4. VGGT aggregator (from scratch)   9. checkpoints: our saves, Qwen2.5-VL dir + VGGT file, VG-LLM dir
    5. geometry merger

Nothing here imports the rest of rft3d.
"""
import contextlib
import inspect
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

# transformers 5.17 has no `mm_encoder_outputs` argument and silently drops unknown forward kwargs: the fused image
# embeddings would be ignored without an error. 5.18 is the first release with the seam (checked: 5.17 no, 5.18 yes).
if "mm_encoder_outputs" not in inspect.signature(Qwen2_5_VLModel.forward).parameters:
    import transformers
    raise ImportError("model.py needs transformers >= 5.18 (Qwen2.5-VL's mm_encoder_outputs), "
                      f"found {transformers.__version__}")

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's and VG-LLM's default system turn
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL image normalisation (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VGGT normalises inside the aggregator
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------------------------------------
# 1. Configs: a plain JSON-able dict {"qwen": Qwen2_5_VLConfig.to_dict(), "vggt": hyperparameters or None, ...}
# -----------------------------------------------------------------------------------------------------------

# Qwen's special tokens in Qwen's order; the tiny tokenizer gives them ids 0..13 (real Qwen: 151643..151656).
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL_ID = 151643  # <|endoftext|> in the real Qwen2.5 vocabulary; specials are contiguous after it
VGGT_1B = dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
               num_register_tokens=4, patch_embed_depth=24, patch_embed_heads=16)


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


def tiny_config(vocab_size, vggt=True):
    """DESIGN section 8's toy size: text hidden 128 x 4 layers, vision depth 2 x 128, a 2-layer 64-wide VGGT."""
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2)
    tiny_vggt = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                     num_register_tokens=4, patch_embed_depth=2, patch_embed_heads=4)
    return _make_config(text, vision, _token_fields(0, len(TINY_SPECIAL_TOKENS)), tiny_vggt if vggt else None,
                        merger_hidden=128, image_width=56)


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
# 4. VGGT aggregator (facebookresearch/vggt, key-compatible with facebook/VGGT-1B's `aggregator.*`)
#    DINOv2 ViT-L/14 + 4 registers as patch embed, then depth x (frame attention, global attention) blocks.
# -----------------------------------------------------------------------------------------------------------


def rope_2d(x, pos, base=100.0):
    """2D rotary embedding: the first half of each head rotates with the row y, the second half with the column x;
    within a half, rotate-half pairing (i, i + d/2) with frequencies base^(-2j/d). x [B,heads,N,D], pos [B,N,2]."""
    d = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    out = []
    for axis, half in enumerate(x.chunk(2, dim=-1)):
        angles = pos[..., axis, None].float() * inv_freq  # [B, N, d/2], float32 for accuracy
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, N, d]
        h1, h2 = half.chunk(2, dim=-1)
        out.append(half * angles.cos().to(x.dtype) + torch.cat([-h2, h1], dim=-1) * angles.sin().to(x.dtype))
    return torch.cat(out, dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, rope_base=None):
        super().__init__()
        self.num_heads, self.rope_base = num_heads, rope_base
        self.qkv = nn.Linear(dim, 3 * dim)
        # VGGT's per-head LayerNorm on q and k (torch default eps 1e-5); DINOv2 has none
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pos=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if pos is not None:
            q, k = rope_2d(q, pos, self.rope_base), rope_2d(k, pos, self.rope_base)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (DINOv2 layout: norm1, attn, ls1, norm2, mlp, ls2)."""

    def __init__(self, dim, num_heads, mlp_ratio, init_values, eps, qk_norm=False, rope_base=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qk_norm, rope_base)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x, pos=None):
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchConv(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # [N,3,H,W] -> [N, h*w, C] in raster order (row-major)
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 ViT with registers, used by VGGT as its patch embed; returns the final-normed patch tokens only."""

    def __init__(self, img_size, patch_size, dim, depth, num_heads, mlp_ratio, num_register_tokens):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size  # pos_embed trained for a grid x grid image
        self.cls_token = nn.Parameter(1e-6 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + self.grid ** 2, dim))
        self.register_tokens = nn.Parameter(1e-6 * torch.randn(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)  # in the checkpoint, unused here
        self.patch_embed = PatchConv(patch_size, dim)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, 1.0, 1e-6) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def resample_pos_embed(self, h, w):
        """cls + patch position embeddings, the patch part resampled bicubic (antialiased) to an h x w grid."""
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):  # x [N,3,H,W] normalised -> [N, h*w, C]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.resample_pos_embed(h, w)
        R = self.register_tokens.shape[1]  # registers go after cls and get no position embedding
        x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + R:]


def _first_and_rest(token, B, S):
    """(1, 2, X, C) learned tokens -> (B*S, X, C): index 0 for the first (reference) frame, index 1 for the others."""
    t = torch.cat([token[:, :1], token[:, 1:].expand(1, S - 1, *token.shape[2:])], dim=1)
    return t.expand(B, S, *token.shape[2:]).reshape(B * S, *token.shape[2:])


class VGGTAggregator(nn.Module):
    def __init__(self, img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                 num_register_tokens=4, patch_embed_depth=24, patch_embed_heads=16, rope_base=100.0, init_values=0.01):
        super().__init__()
        C = embed_dim
        self.patch_size, self.depth = patch_size, depth
        self.patch_embed = DinoV2(img_size, patch_size, C, patch_embed_depth, patch_embed_heads, mlp_ratio,
                                  num_register_tokens)
        self.camera_token = nn.Parameter(1e-6 * torch.randn(1, 2, 1, C))
        self.register_token = nn.Parameter(1e-6 * torch.randn(1, 2, num_register_tokens, C))
        self.patch_start_idx = 1 + num_register_tokens
        # aggregator blocks: torch-default LayerNorm eps (1e-5), per-head q/k LayerNorm, 2D RoPE
        make = lambda: Block(C, num_heads, mlp_ratio, init_values, 1e-5, qk_norm=True, rope_base=rope_base)
        self.frame_blocks = nn.ModuleList([make() for _ in range(depth)])
        self.global_blocks = nn.ModuleList([make() for _ in range(depth)])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        for module in self.modules():  # ViT init for a random (tiny) aggregator; real weights are loaded over it
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def positions(self, n, h, w, device):
        """[n, 5 + h*w, 2] (y, x): special tokens at 0, patch (y, x) + 1 in raster order."""
        yx = torch.cartesian_prod(torch.arange(h, device=device), torch.arange(w, device=device)) + 1
        pos = torch.cat([torch.zeros(self.patch_start_idx, 2, dtype=yx.dtype, device=device), yx])
        return pos.expand(n, -1, -1)

    @staticmethod
    def frame_attention(block, x, pos):  # x [B,S,N,C]: every frame attends within itself
        B, S, N, C = x.shape
        return block(x.reshape(B * S, N, C), pos.reshape(B * S, N, 2)).view(B, S, N, C)

    @staticmethod
    def global_attention(block, x, pos):  # x [B,S,N,C]: all tokens of all frames attend to each other
        B, S, N, C = x.shape
        return block(x.reshape(B, S * N, C), pos.reshape(B, S * N, 2)).view(B, S, N, C)

    def forward(self, images, keep_layer=None):
        """images [B,S,3,H,W] in [0,1] -> (list of depth outputs [B,S,N,2C], patch_start_idx) like the reference;
        with keep_layer (e.g. -2) only the layers up to that one run and only its output [B,S,N,2C] is returned."""
        B, S, _, H, W = images.shape
        h, w = H // self.patch_size, W // self.patch_size
        dtype = self.camera_token.dtype
        x = ((images - self.mean) / self.std).to(dtype).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)  # [B*S, h*w, C]
        tokens = torch.cat([_first_and_rest(self.camera_token, B, S), _first_and_rest(self.register_token, B, S),
                            patches], dim=1)
        N, C = tokens.shape[1:]
        tokens = tokens.view(B, S, N, C)
        pos = self.positions(B * S, h, w, images.device).reshape(B, S, N, 2)
        n_layers = self.depth if keep_layer is None else keep_layer % self.depth + 1
        outputs = []
        for i in range(n_layers):
            frame_out = tokens = self.frame_attention(self.frame_blocks[i], tokens, pos)
            global_out = tokens = self.global_attention(self.global_blocks[i], tokens, pos)
            if keep_layer is None or i == n_layers - 1:
                outputs.append(torch.cat([frame_out, global_out], dim=-1))  # [B,S,N,2C]
        return (outputs if keep_layer is None else outputs[-1]), self.patch_start_idx

# -----------------------------------------------------------------------------------------------------------
# 5. Geometry merger (VG-LLM's `merger.*`): RMSNorm -> 2x2 grouping as Qwen's patch merger -> MLP to d_model
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
# 6. VGLLM
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


class VGLLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config["qwen"]))
        if _tied(self):  # Qwen2.5-VL-3B shares input and output embeddings (not tied by transformers on meta)
            self.qwen.lm_head.weight = self.qwen.model.language_model.embed_tokens.weight
        self.vggt = self.merger = None
        if config.get("vggt"):
            self.vggt = VGGTAggregator(**config["vggt"])
            d_model = config["qwen"]["text_config"]["hidden_size"]
            self.merger = GeometryMerger(2 * config["vggt"]["embed_dim"], config["merger_hidden"], d_model,
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

    # 6a. frozen encoders, once per sample -----------------------------------------------------------------

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
                images = x["vggt_images"].to(self.device)
                flip = self.config.get("reference_frame", "first") == "last"  # VG-LLM's option: last frame as reference
                tokens, start = self.vggt(images.flip(0)[None] if flip else images[None], keep_layer=-2)
                geometry = tokens[0, :, start:]  # [S, h*w, 2C]
                geometry = geometry.flip(0) if flip else geometry
                hw = (images.shape[-2] // self.vggt.patch_size, images.shape[-1] // self.vggt.patch_size)
            n_tokens = (grid.prod(-1) // merge ** 2).tolist()
            encodings.append(Encoding(tuple(vision[i:i + S]), geometry, hw, grid, n_tokens))
            i += S
        return encodings

    # 6b. THE fusion point ---------------------------------------------------------------------------------

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

    # 6c. prompts ------------------------------------------------------------------------------------------

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

    # 6d. per-token log-probs (one call of the root module: FSDP2 wraps the root) ---------------------------

    def forward(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, encodings, temperature=1.0,
                return_entropy=False, chunk_size=512, first_position=0):
        """logp [B, L-1] with logp[b,t] = log softmax(logits[b,t] / temperature)[input_ids[b,t+1]] (+ entropy
        [B, L-1] of the same tempered distribution, no grad). Positions t < first_position are skipped (left 0):
        pass the prompt length - 1 to avoid computing prompt log-probs nobody uses."""
        out = self.qwen.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                              use_cache=False, **self._mm_inputs(image_grid_thw, encodings))
        hidden = out.last_hidden_state[:, first_position:-1]  # the positions that predict a next token
        # Score the distribution generate() samples from: the same temperature and the same suppressed tokens.
        suppress = torch.tensor(self.config["suppress_token_ids"], dtype=torch.long, device=hidden.device)
        logp, entropy = token_logprobs(hidden, self.qwen.lm_head, input_ids[:, first_position + 1:], temperature,
                                       chunk_size, return_entropy, suppress)
        if first_position > 0:
            logp = F.pad(logp, (first_position, 0))
            entropy = F.pad(entropy, (first_position, 0)) if return_entropy else None
        return (logp, entropy) if return_entropy else logp

    # 6e. sampling -----------------------------------------------------------------------------------------

    def generation_config(self, max_new_tokens, temperature=1.0, do_sample=True):
        """Plain sampling at `temperature`: top_p 1 and top_k 0 (transformers' default top_k is 50), no repetition
        penalty; vision and special tokens other than EOS (and unused vocabulary rows) are suppressed."""
        sampling = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else {}  # greedy: argmax
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=1.0,
                                eos_token_id=self.config["eos_token_id"], pad_token_id=self.config["pad_token_id"],
                                suppress_tokens=self.config["suppress_token_ids"], use_cache=True, **sampling)

    @torch.no_grad()
    def generate(self, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True, synced_gpus=False):
        """Completion ids [B, C] (new tokens only; after the first EOS everything is pad_token_id). For group
        sampling repeat the batch rows and the encodings list G times: nothing is re-encoded."""
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

# -----------------------------------------------------------------------------------------------------------
# 7. Chunked per-token log-probs: [B, L, V] logits (V = 151k) never exist at once, in forward or backward
# -----------------------------------------------------------------------------------------------------------


def token_logprobs(hidden, lm_head, targets, temperature=1.0, chunk_size=512, return_entropy=False, suppress=None):
    """hidden [B, L, d], targets [B, L] -> (logp [B, L], entropy [B, L] or None) of softmax(lm_head(hidden) / T).

    suppress: token ids that sampling never draws (generate() sets their logits to -inf), so scoring removes
    them from the softmax too; otherwise pi_theta would differ from the sampler by their probability mass.
    They get a large finite negative logit rather than -inf, so a masked position whose target is one of
    them (padding after EOS) has a finite logp and 0 * logp stays 0.

    Tokens are processed chunk_size at a time, each chunk under torch.utils.checkpoint: backward recomputes that
    chunk's logits instead of keeping them, so only one chunk's [chunk_size, V] logits are alive at a time. The price
    is one extra lm_head matmul per chunk in backward (~2*d*V flops per token, small next to the LLM itself)."""
    B, L, d = hidden.shape
    h, y = hidden.reshape(B * L, d), targets.reshape(B * L)

    def chunk(h_c, y_c):
        # In place where autograd allows it (the matmul's backward needs its inputs, not its output): each extra
        # [n, V] float32 copy here would cost as much memory as the whole chunk.
        z = lm_head(h_c).float().div_(temperature)  # [n, V] float32
        if suppress is not None:
            z.index_fill_(1, suppress, -1e9)
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
# 8. LoRA on the LLM linears (3D-RFT used LoRA for spatial reasoning)
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

# -----------------------------------------------------------------------------------------------------------
# 9. Checkpoints. Every tensor of a file lands somewhere or is a documented ignore (VGGT's heads); anything
#    missing or unexpected raises. Large models are built with parameters on the meta device and the
#    checkpoint tensors assigned in place (no random init, no second copy).
# -----------------------------------------------------------------------------------------------------------

VGGT_HEADS = re.compile(r"^(camera|point|depth|track)_head\.")  # VGGT's prediction heads: not used by VG-LLM features


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (no memory, no init) but real buffers: rotary tables and
    normalisation constants are not in checkpoints, they are computed in __init__."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:  # (re-registering a meta parameter keeps it: weight tying)
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _tied(model):
    return bool(model.config["qwen"].get("tie_word_embeddings", False))


def _assign(model, state, fresh=()):
    """Assign checkpoint tensors to a model built on meta. `fresh`: key prefixes that are initialised anew."""
    expected = set(model.state_dict())
    optional = {"qwen.lm_head.weight"} if _tied(model) else set()  # tied: stored once, as the input embedding
    missing = sorted(k for k in expected - set(state) - optional if not k.startswith(tuple(fresh)))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: {len(missing)} missing {missing[:8]}, "
                       f"{len(unexpected)} unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=False, assign=True)  # shapes are checked here
    if _tied(model):
        model.qwen.lm_head.weight = model.qwen.model.language_model.embed_tokens.weight
    if "merger." in fresh and model.merger is not None:
        old = model.merger
        model.merger = GeometryMerger(old.ln_q.weight.shape[0], old.mlp[0].out_features, old.mlp[2].out_features,
                                      old.merge).to(model.qwen.lm_head.weight.dtype)
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
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
        return load_file(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return load_file(single)


def _full_state_dict(model, state=None):
    """What gets saved: LoRA merged into plain weights (W + scale * B A under the plain key), the tied lm_head
    stored once, DTensors gathered. `state`: an already gathered full state dict of `model` (FSDP2 / DDP)."""
    state = dict(model.state_dict() if state is None else state)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}  # collective
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            A, B, W = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B"), state.pop(f"{name}.base.weight")
            state[f"{name}.weight"] = (W.float() + module.scale * (B.float() @ A.float())).to(W.dtype)
            if f"{name}.base.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    if _tied(model):
        state.pop("qwen.lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_pretrained(model, tokenizer, out_dir, max_shard_bytes=5 * 2 ** 30, state_dict=None):
    """config.json (our dict) + safetensors (sharded HF-style above max_shard_bytes) + tokenizer files.
    LoRA is merged on save (the model itself is left as it is). Under FSDP pass state_dict= a full state dict
    gathered on every rank (e.g. torch.distributed.checkpoint's get_model_state_dict) and call on one rank."""
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


def load_pretrained(path, dtype=None):
    """Layout (c), our own saves -> (model, tokenizer or None)."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = _build(config, _read_safetensors(path), dtype)
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return model, (AutoTokenizer.from_pretrained(path) if has_tokenizer else None)


def _qwen_key(k):
    """transformers 4.x (model.*, visual.*, lm_head.*) or 5.x (model.language_model.*, model.visual.*) -> ours."""
    if k.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return "qwen." + k
    if k.startswith("visual."):
        return "qwen.model." + k
    if k.startswith("model."):
        return "qwen.model.language_model." + k[len("model."):]
    return "unexpected." + k  # reported as unexpected by _assign


def _qwen_dir_config(path, tokenizer, vggt, merger_hidden, image_width):
    """Our config dict for a Qwen2.5-VL / VG-LLM directory; token ids and the suppress list from its tokenizer."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    flags = {k: raw.pop(k) for k in ("use_vggt_feature", "vggt_merger_hidden_dim", "reference_frame") if k in raw}
    qwen = Qwen2_5_VLConfig(**raw).to_dict()  # 4.x flat configs (rope_scaling "mrope") are converted here
    vocab = qwen["text_config"]["vocab_size"]
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    suppress = sorted((specials | set(range(len(tokenizer), vocab))) - {eos})
    config = {"qwen": qwen, "vggt": vggt, "merger_hidden": merger_hidden if vggt else None, "image_width": image_width,
              "reference_frame": flags.get("reference_frame", "first"), "eos_token_id": eos, "pad_token_id": pad,
              "suppress_token_ids": suppress}
    return config


def _load_vggt_file(path):
    """VGGT-1B `model.safetensors` or `model.pt` (a plain state dict; weights_only, never arbitrary pickles)."""
    if str(path).endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def from_qwen_and_vggt(qwen_dir, vggt_file, dtype=torch.bfloat16, vggt_config=None, merger_hidden=4096,
                       image_width=518):
    """Layout (a): a transformers Qwen2.5-VL directory (4.x or 5.x keys) + VGGT-1B weights (`aggregator.*` used,
    heads ignored; vggt_file=None turns the geometry branch off). The merger is freshly initialised.
    Returns (model, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    vggt = (vggt_config or dict(VGGT_1B)) if vggt_file else None
    config = _qwen_dir_config(qwen_dir, tokenizer, vggt, merger_hidden, image_width)
    state = {_qwen_key(k): v for k, v in _read_safetensors(qwen_dir).items()}
    ignored = 0
    if vggt_file:
        for k, v in _load_vggt_file(vggt_file).items():
            if VGGT_HEADS.match(k):
                ignored += 1
            else:
                state[("vggt." + k[len("aggregator."):]) if k.startswith("aggregator.") else "unexpected." + k] = v
    model = _build(config, state, dtype, fresh=("merger.",))
    print(f"from_qwen_and_vggt: {len(state)} tensors loaded, {ignored} VGGT head tensors ignored, merger fresh")
    return model, tokenizer


def from_vgllm(path, dtype=torch.bfloat16, vggt_config=None, image_width=518):
    """Layout (b): a VG-LLM checkpoint directory (4.x keys + `vggt.aggregator.*`, ignored `vggt.*_head.*`,
    `merger.*`; config flags use_vggt_feature, vggt_merger_hidden_dim, reference_frame). Returns (model, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    use_vggt = raw.get("use_vggt_feature", False)
    vggt = (vggt_config or dict(VGGT_1B)) if use_vggt else None
    config = _qwen_dir_config(path, tokenizer, vggt, raw.get("vggt_merger_hidden_dim", 4096), image_width)
    state, ignored = {}, 0
    for k, v in _read_safetensors(path).items():
        if k.startswith("vggt.") and VGGT_HEADS.match(k[len("vggt."):]):
            ignored += 1
        elif k.startswith("vggt.aggregator."):
            state["vggt." + k[len("vggt.aggregator."):]] = v
        elif k.startswith("merger."):
            state[k] = v
        else:
            state[_qwen_key(k)] = v
    model = _build(config, state, dtype)
    print(f"from_vgllm: {len(state)} tensors loaded, {ignored} VGGT head tensors ignored")
    return model, tokenizer
