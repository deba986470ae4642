"""vggt.py: the VGGT aggregator's layout at full size, its 2D RoPE, attention and outputs."""
import numpy as np
import torch

import vggt as V


def expected_vggt_layout(C=1024, depth=24, pe_depth=24, heads=16, R=4, grid=37, p=14, mlp=4):
    """DESIGN section 5's key layout, written out independently of model.py."""
    e = {"camera_token": (1, 2, 1, C), "register_token": (1, 2, R, C),
         "patch_embed.cls_token": (1, 1, C), "patch_embed.pos_embed": (1, 1 + grid * grid, C),
         "patch_embed.register_tokens": (1, R, C), "patch_embed.mask_token": (1, C),
         "patch_embed.patch_embed.proj.weight": (C, 3, p, p),
         "patch_embed.patch_embed.proj.bias": (C,), "patch_embed.norm.weight": (C,),
         "patch_embed.norm.bias": (C,)}

    def block(prefix, qk_norm):
        shapes = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C),
                  "attn.qkv.bias": (3 * C,), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
                  "ls1.gamma": (C,), "norm2.weight": (C,), "norm2.bias": (C,),
                  "mlp.fc1.weight": (mlp * C, C), "mlp.fc1.bias": (mlp * C,),
                  "mlp.fc2.weight": (C, mlp * C), "mlp.fc2.bias": (C,), "ls2.gamma": (C,)}
        if qk_norm:
            shapes.update({f"attn.{n}_norm.{w}": (C // heads,)
                           for n in "qk" for w in ("weight", "bias")})
        e.update({f"{prefix}.{k}": v for k, v in shapes.items()})

    for i in range(pe_depth):
        block(f"patch_embed.blocks.{i}", False)
    for i in range(depth):
        block(f"frame_blocks.{i}", True)
        block(f"global_blocks.{i}", True)
    return e


def test_vggt_full_size_layout_on_meta():
    with torch.device("meta"):
        agg = V.VGGTAggregator(**V.VGGT_1B)
    got = {k: tuple(v.shape) for k, v in agg.state_dict().items()}
    assert got == expected_vggt_layout()
    assert len(got) == 1210
    assert sum(v.numel() for v in agg.state_dict().values()) == 909_112_320


def rope_reference(x, y_pos, x_pos, base=100.0):
    """VGGT's 2D RoPE written pair by pair: head half 0 rotates with y, half 1 with x; in a half of
    size d the pair (i, i + d/2) is rotated by angle pos * base^(-2i/d)."""
    out = x.clone()
    D = x.shape[-1]
    d = D // 2
    for half, pos in ((0, y_pos), (1, x_pos)):
        for i in range(d // 2):
            a, b = half * d + i, half * d + i + d // 2
            theta = pos * base ** (-2 * i / d)
            out[..., a] = x[..., a] * np.cos(theta) - x[..., b] * np.sin(theta)
            out[..., b] = x[..., b] * np.cos(theta) + x[..., a] * np.sin(theta)
    return out


def test_rope_2d_formula_and_relative_invariance():
    torch.manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 16, dtype=torch.float64),
            torch.randn(1, 1, 1, 16, dtype=torch.float64))
    pos = lambda y, x: torch.tensor([[[y, x]]])
    assert torch.allclose(V.rope_2d(q, pos(3, 5)), rope_reference(q, 3, 5))
    assert torch.allclose(V.rope_2d(q, pos(0, 0)), q)
    dot = lambda p1, p2: (V.rope_2d(q, pos(*p1)) * V.rope_2d(k, pos(*p2))).sum()
    base = dot((2, 7), (5, 1))
    for shift in ((1, 0), (0, 3), (4, 9)):  # q.k depends only on the 2D offset
        assert torch.allclose(base, dot((2 + shift[0], 7 + shift[1]), (5 + shift[0], 1 + shift[1])))
    assert not torch.allclose(base, dot((2, 7), (5, 2)))


def test_global_attention_equals_frame_attention_for_one_frame(cfg):
    torch.manual_seed(0)
    agg = V.VGGTAggregator(**cfg["vggt"])
    block = agg.global_blocks[0]
    x = torch.randn(2, 1, 5 + 16, 64)
    pos = agg.positions(2, 4, 4, "cpu").view(2, 1, 21, 2)
    assert torch.allclose(agg.frame_attention(block, x, pos), agg.global_attention(block, x, pos),
                          atol=1e-6)
    x2, pos2 = torch.randn(1, 2, 21, 64), agg.positions(2, 4, 4, "cpu").view(1, 2, 21, 2)
    assert not torch.allclose(agg.frame_attention(block, x2, pos2),
                              agg.global_attention(block, x2, pos2), atol=1e-4)


def test_pos_embed_resampling_is_identity_at_native_grid():
    torch.manual_seed(0)
    for img_size in (56, 518):  # tiny 4x4 and VGGT-1B's 37x37
        dino = V.DinoV2(img_size, 14, 8, 0, 2, 4.0, 4)
        g = img_size // 14
        assert torch.allclose(dino.resample_pos_embed(g, g), dino.pos_embed, atol=1e-5)
        assert dino.resample_pos_embed(g - 1, g + 2).shape == (1, 1 + (g - 1) * (g + 2), 8)


def test_aggregator_outputs_and_lean_path(cfg):
    torch.manual_seed(0)
    agg = V.VGGTAggregator(**cfg["vggt"]).eval().requires_grad_(False)
    agg.camera_token.normal_()  # make the first-frame / other-frame tokens clearly different
    agg.register_token.normal_()
    images = torch.rand(1, 3, 3, 56, 70)  # non-square: 4 x 5 patches
    outputs, start = agg(images)
    assert start == 5 and len(outputs) == 2 and outputs[0].shape == (1, 3, 5 + 20, 128)
    lean, _ = agg(images, keep_layer=-2)
    assert torch.equal(lean, outputs[-2])
    pos = agg.positions(1, 4, 5, "cpu")[0]  # specials at 0, patch (y, x) + 1 in raster order
    assert pos[:5].abs().sum() == 0 and pos[5 + 2 * 5 + 3].tolist() == [3, 4]
    # the reference frame is special: swapping frames 1 and 2 permutes
    # outputs, swapping 0 and 1 changes them
    swapped, _ = agg(images[:, [0, 2, 1]], keep_layer=-1)
    assert torch.allclose(swapped[:, [0, 2, 1]], outputs[-1], atol=1e-5)
    swapped0, _ = agg(images[:, [1, 0, 2]], keep_layer=-1)
    assert not torch.allclose(swapped0[:, [1, 0, 2]], outputs[-1], atol=1e-4)
    # the interface model.py uses: layer -2's patch tokens of one video and the patch grid
    features, hw = agg.features(images[0])
    assert hw == (4, 5) and agg.out_dim == 128 and torch.equal(features, outputs[-2][0, :, start:])
