"""vggt.py: the geometry encoder of VG-LLM, VGGT's aggregator, from scratch (facebookresearch/vggt),
key-compatible with the official facebook/VGGT-1B checkpoint's `aggregator.*` tensors.

    frames [S, 3, H, W] in [0, 1] --DINOv2 patch embed--> depth x (frame attention, global
        attention) blocks --features()--> patch tokens of layer -2 [S, h*w, 2C] (frame and global
        outputs concatenated), grid (h, w)

What model.py and checkpoints.py use (a fork that swaps the geometry encoder replaces this file,
keeping these):
    VGGT_1B                     VGGT-1B's hyperparameters (stored under "vggt" in our config.json)
    VGGTAggregator(**config)    the module; .out_dim is the width of its features = the merger's
                                input width
    VGGTAggregator.features(x)  images [S, 3, H, W] in [0, 1], reference frame first
                                -> ([S, h*w, out_dim], (h, w))
    split_checkpoint(state)     a VGGT-1B state dict -> (the aggregator's tensors, head keys
                                ignored, unexpected)
    read_checkpoint(path)       model.safetensors or model.pt (a plain state dict, weights_only)
                                -> state dict

Sections: 1. attention pieces (2D RoPE, pre-norm blocks with LayerScale)  2. DINOv2 patch embed
3. the aggregator  4. the checkpoint file. Nothing here imports the rest of rft3d.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VGGT normalises inside the aggregator
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGT_1B = dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
               num_register_tokens=4, patch_embed_depth=24, patch_embed_heads=16)
FEATURE_LAYER = -2  # VG-LLM takes the second-to-last layer's output

# --------------------------------------------------------------------------------------------------
# 1. Attention pieces: 2D rotary embedding, attention with per-head q/k norm, pre-norm blocks with
#    LayerScale
# --------------------------------------------------------------------------------------------------

def rope_2d(x, pos, base=100.0):
    """2D rotary embedding: the first half of each head rotates with the row y, the second half
    with the column x; within a half, rotate-half pairing (i, i + d/2) with frequencies
    base^(-2j/d). x [B,heads,N,D], pos [B,N,2]."""
    d = x.shape[-1] // 2
    # inv_freq [d/2]: base^(-2j/d)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    out = []
    for axis, half in enumerate(x.chunk(2, dim=-1)):
        angles = pos[..., axis, None].float() * inv_freq  # [B, N, d/2], float32 for accuracy
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, N, d]
        h1, h2 = half.chunk(2, dim=-1)
        out.append(half * angles.cos().to(x.dtype)
                   + torch.cat([-h2, h1], dim=-1) * angles.sin().to(x.dtype))
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
        q, k, v = (self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
                   .permute(2, 0, 3, 1, 4))
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
    """Pre-norm transformer block with LayerScale (DINOv2 layout: norm1, attn, ls1, norm2, mlp,
    ls2)."""

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


# --------------------------------------------------------------------------------------------------
# 2. DINOv2 ViT with 4 registers: VGGT's patch embed (`patch_embed.*`)
# --------------------------------------------------------------------------------------------------


class PatchConv(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # [N,3,H,W] -> [N, h*w, C] in raster order (row-major)
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 ViT with registers, used by VGGT as its patch embed; returns the final-normed patch
    tokens only."""

    def __init__(self, img_size, patch_size, dim, depth, num_heads, mlp_ratio, num_register_tokens):
        super().__init__()
        # pos_embed is trained for a grid x grid image
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.cls_token = nn.Parameter(1e-6 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + self.grid ** 2, dim))
        self.register_tokens = nn.Parameter(1e-6 * torch.randn(1, num_register_tokens, dim))
        # in the checkpoint, unused here
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.patch_embed = PatchConv(patch_size, dim)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, 1.0, 1e-6)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def resample_pos_embed(self, h, w):
        """cls + patch position embeddings, the patch part resampled bicubic (antialiased) to an
        h x w grid."""
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)],
                         dim=1).to(self.pos_embed.dtype)

    def forward(self, x):  # x [N,3,H,W] normalised -> [N, h*w, C]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = (torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
             + self.resample_pos_embed(h, w))
        R = self.register_tokens.shape[1]  # registers go after cls and get no position embedding
        x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + R:]


# --------------------------------------------------------------------------------------------------
# 3. The aggregator: camera + register tokens per frame, depth x (frame block, global block)
# --------------------------------------------------------------------------------------------------


def _first_and_rest(token, B, S):
    """(1, 2, X, C) learned tokens -> (B*S, X, C): index 0 for the first (reference) frame, index 1
    for the others."""
    t = torch.cat([token[:, :1], token[:, 1:].expand(1, S - 1, *token.shape[2:])], dim=1)
    return t.expand(B, S, *token.shape[2:]).reshape(B * S, *token.shape[2:])


class VGGTAggregator(nn.Module):
    def __init__(self, img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                 mlp_ratio=4.0, num_register_tokens=4, patch_embed_depth=24, patch_embed_heads=16,
                 rope_base=100.0, init_values=0.01):
        super().__init__()
        C = embed_dim
        self.patch_size, self.depth = patch_size, depth
        self.out_dim = 2 * C  # each output concatenates the frame and the global block's tokens
        self.patch_embed = DinoV2(img_size, patch_size, C, patch_embed_depth, patch_embed_heads,
                                  mlp_ratio, num_register_tokens)
        self.camera_token = nn.Parameter(1e-6 * torch.randn(1, 2, 1, C))
        self.register_token = nn.Parameter(1e-6 * torch.randn(1, 2, num_register_tokens, C))
        self.patch_start_idx = 1 + num_register_tokens
        # aggregator blocks: torch-default LayerNorm eps (1e-5), per-head q/k LayerNorm, 2D RoPE
        make = lambda: Block(C, num_heads, mlp_ratio, init_values, 1e-5, qk_norm=True,
                             rope_base=rope_base)
        self.frame_blocks = nn.ModuleList([make() for _ in range(depth)])
        self.global_blocks = nn.ModuleList([make() for _ in range(depth)])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1),
                             persistent=False)
        # ViT init for a random (tiny) aggregator; real weights are loaded over it
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def positions(self, n, h, w, device):
        """[n, 5 + h*w, 2] (y, x): special tokens at 0, patch (y, x) + 1 in raster order."""
        yx = torch.cartesian_prod(torch.arange(h, device=device),
                                  torch.arange(w, device=device)) + 1
        pos = torch.cat([torch.zeros(self.patch_start_idx, 2, dtype=yx.dtype, device=device), yx])
        return pos.expand(n, -1, -1)

    @staticmethod
    def frame_attention(block, x, pos):  # x [B,S,N,C]: every frame attends within itself
        B, S, N, C = x.shape
        return block(x.reshape(B * S, N, C), pos.reshape(B * S, N, 2)).view(B, S, N, C)

    @staticmethod
    def global_attention(block, x, pos):  # x [B,S,N,C]: all frames' tokens attend to each other
        B, S, N, C = x.shape
        return block(x.reshape(B, S * N, C), pos.reshape(B, S * N, 2)).view(B, S, N, C)

    def forward(self, images, keep_layer=None):
        """images [B,S,3,H,W] in [0,1] -> (list of depth outputs [B,S,N,2C], patch_start_idx) like
        the reference; with keep_layer (e.g. -2) only the layers up to that one run and only its
        output [B,S,N,2C] is returned."""
        B, S, _, H, W = images.shape
        h, w = H // self.patch_size, W // self.patch_size
        dtype = self.camera_token.dtype
        x = ((images - self.mean) / self.std).to(dtype).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)  # [B*S, h*w, C]
        tokens = torch.cat([_first_and_rest(self.camera_token, B, S),
                            _first_and_rest(self.register_token, B, S), patches], dim=1)
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

    @torch.no_grad()
    def features(self, images, layer=FEATURE_LAYER):
        """What VG-LLM feeds its geometry merger: images [S, 3, H, W] in [0, 1] (one video,
        reference frame first) -> (patch tokens of `layer` [S, h*w, out_dim] in raster order, the
        patch grid (h, w)). Frozen: no grad."""
        tokens, start = self(images[None], keep_layer=layer)  # [1, S, N, 2C]
        return tokens[0, :, start:], (images.shape[-2] // self.patch_size,
                                      images.shape[-1] // self.patch_size)


# --------------------------------------------------------------------------------------------------
# 4. The checkpoint file: facebook/VGGT-1B's model.safetensors / model.pt, `aggregator.*` used,
#    heads ignored
# --------------------------------------------------------------------------------------------------

# VGGT's prediction heads: VG-LLM uses none of them
HEADS = re.compile(r"^(camera|point|depth|track)_head\.")


def read_checkpoint(path):
    """VGGT-1B `model.safetensors` or `model.pt` (a plain state dict: weights_only, never arbitrary
    pickles)."""
    if str(path).endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def split_checkpoint(state):
    """A VGGT state dict -> (aggregator tensors without the `aggregator.` prefix, ignored head keys,
    unexpected tensors {key: tensor}). The caller decides what to do with unexpected tensors
    (checkpoints.py raises)."""
    aggregator, ignored, unexpected = {}, [], {}
    for k, v in state.items():
        if k.startswith("aggregator."):
            aggregator[k[len("aggregator."):]] = v
        elif HEADS.match(k):
            ignored.append(k)
        else:
            unexpected[k] = v
    return aggregator, ignored, unexpected
