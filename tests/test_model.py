"""Tests for model.py: VGGT layout at full size, preprocessing and token order against
transformers' own Qwen ordering, fusion, chunked log-probs, sampling, LoRA and every checkpoint
layout. Tiny sizes, CPU, seconds."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from transformers.vision_utils import get_vision_position_ids

import checkpoints as C
import decoding
import lora
import model as M
import vggt as V

CORPUS = ['<think>Two objects.</think><answer>[{"label": "chair", "bbox_3d": [0.12, -1.5, 2.0, '
          '0.5, 0.5, 0.9, 0.0, 0.0, 0.0]}, {"label": "table", "bbox_3d": [1.0, 0.3, 2.5, 1.2, 0.8, '
          '0.7, 0.1, 0.0, 0.0]}]</answer>'] * 20 + [
    "Frame-0: Frame-1: Detect the 3D bounding boxes in the camera coordinate system of the "
    "first frame. Output a json list where each entry contains the object name in \"label\" "
    "and its 3D bounding box."] * 10
PROMPT = ("Frame-0: <image>Frame-1: <image>Frame-2: <image>Frame-3: <image>"
          "Detect the 3D bounding boxes.")


@pytest.fixture(scope="module")
def tok():
    return M.build_tiny_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def cfg(tok):
    # 4 x 4 patches of a 56 px frame: the shapes below
    return M.tiny_config(len(tok), patch_size=14)


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return M.VGLLM(cfg)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(2)]


def full_batch(model, tok, encodings, completions=None, prompts=None):
    """Prompt batch + (right-padded) completions -> forward inputs."""
    prompts = prompts or [PROMPT] * len(encodings)
    batch = model.prompt_batch(tok, prompts, encodings)
    if completions is None:
        completions = torch.randint(20, len(tok), (len(encodings), 6))
    ids = torch.cat([batch["input_ids"], completions], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(completions)], 1)
    types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completions)], 1)
    return batch, (ids, mask, types, batch["image_grid_thw"])


def naive_logits(model, ids, mask, types, grid, encodings):
    """Full [B, L, V] logits straight from transformers' model with the same image embeddings."""
    return model.qwen(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                      **model.mm_inputs(grid, encodings)).logits


# --------------------------------------------------------------------------------------------------
# VGGT aggregator
# --------------------------------------------------------------------------------------------------

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


def test_real_configs_on_meta():
    counts = {}
    for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        cfg = M.real_config(name)
        with C._parameters_on_meta():
            model = M.VGLLM(cfg)
        counts[name] = sum(p.numel() for p in model.qwen.parameters())
        assert sum(p.numel() for p in model.vggt.parameters()) == 909_112_320
        assert (cfg["qwen"]["vision_config"]["out_hidden_size"]
                == cfg["qwen"]["text_config"]["hidden_size"])
        json.dumps(cfg)  # plain JSON
    # Hugging Face model cards: Qwen2.5-VL-3B-Instruct 3.75B parameters (tied
    # embeddings), 7B-Instruct 8.29B
    assert counts["qwen2.5-vl-3b"] == 3_754_622_976
    assert counts["qwen2.5-vl-7b"] == 8_292_166_656


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


# --------------------------------------------------------------------------------------------------
# preprocessing and token order
# --------------------------------------------------------------------------------------------------

def unnormalise_patches(pixel_values, p=14):
    """pixel_values rows -> uint8-valued [N, 3, p, p] (first temporal copy),
    undoing the CLIP normalisation."""
    x = pixel_values.view(len(pixel_values), 3, 2, p, p)
    assert torch.equal(x[:, :, 0], x[:, :, 1])  # still frame repeated for the temporal patch
    x = (x[:, :, 0] * torch.tensor(M.CLIP_STD).view(3, 1, 1)
         + torch.tensor(M.CLIP_MEAN).view(3, 1, 1))
    return x * 255


def test_qwen_patch_order_matches_transformers(cfg):
    """Patch (r, c) holds pixels (10r, 10c): each row of pixel_values must sit where transformers'
    own vision-tower position ids (get_vision_position_ids) say that patch belongs."""
    h, w = 6, 8
    img = np.zeros((1, 14 * h, 14 * w, 3), dtype=np.uint8)
    for r in range(h):
        for c in range(w):
            img[0, 14 * r:14 * r + 14, 14 * c:14 * c + 14] = (10 * r, 10 * c, 0)
    out = M.preprocess(img, dict(cfg, image_width=14 * w))
    assert out["image_grid_thw"].tolist() == [[1, h, w]]
    rc = unnormalise_patches(out["pixel_values"]).mean(dim=(2, 3))[:, :2].round() / 10
    assert torch.equal(rc.long(), get_vision_position_ids(out["image_grid_thw"], 2))


def test_merger_grouping_matches_qwen_merger_order():
    """Qwen's patch merger concatenates 4 consecutive rows of the vision-tower order; group_2x2 of a
    raster-ordered VGGT feature map must put the same (r, c) patches in each merged token, in the
    same order. Odd grids crop."""
    for h, w in ((4, 6), (7, 9)):
        # raster order [1, h*w, 2]
        rc = torch.cartesian_prod(torch.arange(h), torch.arange(w)).float()[None]
        grouped = M.group_2x2(rc, h, w).view(-1, 4, 2)
        qwen = get_vision_position_ids(
            torch.tensor([[1, h // 2 * 2, w // 2 * 2]]), 2).view(-1, 4, 2)
        assert torch.equal(grouped.long(), qwen)


def test_preprocess_vgllm_sizes_and_same_pixels(cfg):
    rng = np.random.RandomState(1)
    real = dict(cfg, image_width=518)
    for (H, W), vggt_hw, grid in (((480, 640), (392, 518), (28, 36)),
                                  ((640, 480), (518, 518), (36, 36))):
        out = M.preprocess(rng.randint(0, 256, (2, H, W, 3), dtype=np.uint8), real)
        assert out["vggt_images"].shape == (2, 3, *vggt_hw)
        assert out["image_grid_thw"].tolist() == [[1, *grid]] * 2
        gh, gw = grid
        # Qwen sees VGGT's pixels cropped to the even grid: rebuild its image from
        # the patches via transformers' ids
        patches = unnormalise_patches(out["pixel_values"]).view(2, gh * gw, 3, 14, 14)
        ids = get_vision_position_ids(out["image_grid_thw"][:1], 2)
        rebuilt = torch.zeros(2, 3, gh * 14, gw * 14)
        for j, (r, c) in enumerate(ids.tolist()):
            rebuilt[:, :, 14 * r:14 * r + 14, 14 * c:14 * c + 14] = patches[:, j]
        assert torch.allclose(rebuilt, out["vggt_images"][:, :, :gh * 14, :gw * 14] * 255,
                              atol=1e-3)
    with pytest.raises(ValueError):
        M.preprocess(np.zeros((2, 8, 8), dtype=np.uint8), real)


# --------------------------------------------------------------------------------------------------
# tokenizer and prompts
# --------------------------------------------------------------------------------------------------

def test_tiny_tokenizer(tok, cfg, tmp_path):
    assert (tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
            and tok.pad_token_id != tok.eos_token_id)
    assert [tok.convert_tokens_to_ids(t) for t in M.TINY_SPECIAL_TOKENS] == list(range(14))
    M.check_tokenizer(cfg, tok)
    ids = tok("[-12.5, {3}]", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert (pieces[:6] == ["[", "-", "1", "2", ".", "5"] and "{" in pieces and "}" in pieces
            and "]" in pieces)
    text = CORPUS[0]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text) / 2  # merges do happen
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert (again(text)["input_ids"] == tok(text)["input_ids"]
            and again.pad_token_id == tok.pad_token_id)
    chat = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")


def test_prompt_batch(tok, cfg, frames):
    model = make_model(cfg)
    enc = model.encode(frames)
    batch = model.prompt_batch(tok, [PROMPT, "<image>" * 4 + "Hi."], enc)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    q = cfg["qwen"]
    for b in range(2):
        assert mask[b, -1] == 1 and (mask[b].cumsum(0) > 0).long().equal(mask[b])  # left padding
        assert (ids[b][mask[b] == 0] == cfg["pad_token_id"]).all()
        assert torch.equal(types[b] == 1, ids[b] == q["image_token_id"])
        # nothing truncated
        assert (ids[b] == q["image_token_id"]).sum() == sum(enc[b].n_tokens_per_image)
        starts = (ids[b] == q["vision_start_token_id"]).nonzero()[:, 0]
        assert len(starts) == 4 and (ids[b][starts + 1] == q["image_token_id"]).all()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 8
    text = tok.decode(ids[0][mask[0] == 1])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\nFrame-0: ")
    assert text.endswith("Detect the 3D bounding boxes.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="placeholders"):
        model.prompt_batch(tok, ["<image> only one"], enc[:1])


# --------------------------------------------------------------------------------------------------
# forward, gradients, fusion
# --------------------------------------------------------------------------------------------------

def test_chunked_logp_equals_naive_with_gradient(tok, cfg, frames):
    model = make_model(cfg)
    enc = model.encode(frames)
    _, (ids, mask, types, grid) = full_batch(model, tok, enc)
    T = 0.7
    w = torch.randn(ids.shape[0], ids.shape[1] - 1)
    params = model.trainable_parameters()

    logp, ent = model(ids, mask, types, grid, enc, temperature=T, return_entropy=True, chunk_size=7)
    grads = torch.autograd.grad((logp * w).sum(), params)
    logits = naive_logits(model, ids, mask, types, grid, enc)[:, :-1] / T
    # never sampled, never scored
    logits = logits.index_fill(-1, torch.tensor(cfg["suppress_token_ids"]), -1e9)
    logp_ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    grads_ref = torch.autograd.grad((logp_ref * w).sum(), params)
    p = torch.softmax(logits, -1)
    assert torch.allclose(logp, logp_ref, atol=1e-5)
    assert (torch.allclose(ent, -torch.special.xlogy(p, p).sum(-1), atol=1e-4)
            and not ent.requires_grad)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-4)
    # skipping the prompt positions leaves the rest unchanged
    P = ids.shape[1] - 6
    tail = model(ids, mask, types, grid, enc, temperature=T, first_position=P - 1)
    assert (torch.allclose(tail[:, P - 1:], logp[:, P - 1:], atol=1e-6)
            and (tail[:, :P - 1] == 0).all())


def test_frozen_parts_get_no_gradient(tok, cfg, frames):
    model = make_model(cfg)
    enc = model.encode(frames)
    _, inputs = full_batch(model, tok, enc)
    model(*inputs, enc).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.qwen.model.visual.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.vggt.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.merger.parameters())
    llm, merger = model.param_groups()
    assert len(merger) == 5 and all(p.grad is not None for p in llm)  # ln_q.weight, mlp.0, mlp.2
    assert {id(p) for p in llm + merger} == {id(p) for p in model.trainable_parameters()}
    assert not model.qwen.model.visual.training and not model.vggt.training and model.training


def test_group_of_G_from_one_encoding_equals_G_encodings(tok, cfg, frames):
    model = make_model(cfg)
    G = 3
    shared = model.encode(frames[:1]) * G
    separate = model.encode(frames[:1] * G)
    for e in separate:
        assert all(torch.allclose(a, b, atol=1e-6)
                   for a, b in zip(e.image_embeds, shared[0].image_embeds))
        assert torch.allclose(e.geometry, shared[0].geometry, atol=1e-6)
    completions = torch.randint(20, len(tok), (1, 6)).repeat(G, 1)
    results = []
    for enc in (shared, separate):
        model.zero_grad()
        batch, inputs = full_batch(model, tok, enc, completions)
        logp = model(*inputs, enc)
        logp.sum().backward()
        greedy = model.generate(batch, enc, 8, do_sample=False)
        torch.manual_seed(5)
        sampled = model.generate(batch, enc, 8, temperature=1.0)
        results.append((logp.detach(), [p.grad.clone() for p in model.trainable_parameters()],
                        greedy, sampled))
    (lp1, g1, gr1, s1), (lp2, g2, gr2, s2) = results
    assert torch.allclose(lp1, lp2, atol=1e-5) and torch.equal(gr1, gr2) and torch.equal(s1, s2)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))


def test_mrope_positions_matter(tok, cfg, frames):
    model = make_model(cfg).eval()
    enc = model.encode(frames[:1])
    _, (ids, mask, types, grid) = full_batch(model, tok, enc)
    with torch.no_grad():
        logp = model(ids, mask, types, grid, enc)
        other_grid = grid.clone()
        other_grid[0] = torch.tensor([1, 2, 8])  # same 4 tokens, laid out 1 x 4 instead of 2 x 2
        assert not torch.allclose(logp, model(ids, mask, types, other_grid, enc), atol=1e-4)
        assert not torch.allclose(logp, model(ids, mask, None, grid, enc), atol=1e-4)  # 1D fallback
        pos, _ = model.qwen.model.get_rope_index(ids, types, grid, attention_mask=mask)
        image = (ids[0] == cfg["qwen"]["image_token_id"]).nonzero()[:4, 0]
        assert pos[1:, 0, image].T.tolist() == [[a + r, a + c] for a in [pos[1, 0, image[0]].item()]
                                                for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))]


def test_geometry_changes_embeddings_only_through_merger(tok, cfg, frames):
    model = make_model(cfg)
    enc = model.encode(frames[:1])[0]
    fused = model.image_embeds([enc])
    geo = model.merger(enc.geometry, *enc.geometry_hw).split(enc.n_tokens_per_image)
    for f, v, g in zip(fused, enc.image_embeds, geo):
        assert torch.allclose(f, v + g, atol=1e-6)
    plain = M.VGLLM(M.tiny_config(len(tok), vggt=False, patch_size=14))
    e = plain.encode(frames[:1])[0]
    assert plain.vggt is None and plain.merger is None and e.geometry is None
    assert all(torch.equal(a, b) for a, b in zip(plain.image_embeds([e]), e.image_embeds))


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------

def test_greedy_generate_matches_forward_argmax(tok, cfg, frames):
    model = make_model(cfg).eval()
    enc = model.encode(frames)
    batch = model.prompt_batch(tok, [PROMPT, "<image>" * 4 + "Hi."], enc)
    completion = model.generate(batch, enc, 10, do_sample=False)
    _, (ids, mask, types, grid) = full_batch(model, tok, enc, completion)
    with torch.no_grad():
        logits = naive_logits(model, ids, mask, types, grid, enc)
    logits[..., cfg["suppress_token_ids"]] = -float("inf")
    P = batch["input_ids"].shape[1]
    best = logits[:, P - 1:-1].argmax(-1)
    for b in range(2):
        n = completion.shape[1]
        eos = (completion[b] == cfg["eos_token_id"]).nonzero()
        n = eos[0, 0].item() + 1 if len(eos) else n
        assert torch.equal(completion[b, :n], best[b, :n])
        assert (completion[b, n:] == cfg["pad_token_id"]).all()


def test_sampling_is_plain_tempered_softmax(tok, cfg, frames):
    model = make_model(cfg).eval()
    enc = model.encode(frames[:1])
    batch = model.prompt_batch(tok, [PROMPT], enc)
    gc = decoding.generation_config(model, 3, temperature=0.7)
    gc.output_scores = gc.output_logits = gc.return_dict_in_generate = True
    out = model.qwen.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              mm_token_type_ids=batch["mm_token_type_ids"], generation_config=gc,
                              **model.mm_inputs(batch["image_grid_thw"], enc))
    allowed = torch.ones(len(tok), dtype=torch.bool)
    allowed[cfg["suppress_token_ids"]] = False
    for scores, logits in zip(out.scores, out.logits):
        assert torch.isfinite(scores[0]).sum() == allowed.sum()  # no top-k / top-p truncation
        assert torch.allclose(scores[0, allowed], logits[0, allowed] / 0.7, atol=1e-5)
        assert torch.isinf(scores[0, ~allowed]).all()


def test_generate_never_emits_suppressed_tokens(tok, cfg, frames):
    model = make_model(cfg).eval()
    suppressed = torch.tensor(cfg["suppress_token_ids"])
    with torch.no_grad():  # rig the head so that, unsuppressed, vision/special tokens would win
        W = model.qwen.lm_head.weight
        W.zero_()
        W[suppressed] = 5 * torch.randn(len(suppressed), W.shape[1])
    enc = model.encode(frames) * 2
    batch = model.prompt_batch(tok, [PROMPT] * 4, enc)
    _, inputs = full_batch(model, tok, enc)
    with torch.no_grad():
        logits = naive_logits(model, *inputs, enc)
    assert torch.isin(logits.argmax(-1), suppressed).float().mean() > 0.9
    torch.manual_seed(0)
    out = model.generate(batch, enc, 30, temperature=1.0)
    assert not torch.isin(out, suppressed[suppressed != cfg["pad_token_id"]]).any()
    for row in out:  # pad only after an EOS
        eos = (row == cfg["eos_token_id"]).nonzero()
        first = eos[0, 0].item() if len(eos) else len(row)
        assert not (row[:first] == cfg["pad_token_id"]).any()


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------

def test_lora_starts_as_exact_noop_and_trains(tok, cfg, frames, tmp_path):
    model = make_model(cfg)
    enc = model.encode(frames)
    _, inputs = full_batch(model, tok, enc)
    before = model(*inputs, enc).detach()
    # targets that can be sampled
    text = ~torch.isin(inputs[0][:, 1:], torch.tensor(cfg["suppress_token_ids"]))
    base = {k: v.clone() for k, v in model.qwen.state_dict().items()}
    lora.apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(*inputs, enc).detach(), before)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("merger.") for n in names)
    assert len([n for n in names if n.endswith("lora_B")]) == 4 * 7
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (-model(*inputs, enc)[text].mean()).backward()
        opt.step()
    after = model(*inputs, enc).detach()
    assert after[text].mean() > before[text].mean() + 1e-3
    lora_sd = model.qwen.state_dict()
    assert all(torch.equal(lora_sd[k.replace("_proj.", "_proj.base.")]
                           if k.replace("_proj.", "_proj.base.") in lora_sd
                           else lora_sd[k], v) for k, v in base.items())  # base weights untouched
    C.save_pretrained(model, tok, tmp_path / "a")  # merged on save, model unchanged
    # a gathered (FSDP) state dict
    C.save_pretrained(model, tok, tmp_path / "b", state_dict=model.state_dict())
    for d in ("a", "b"):
        loaded, _ = C.load_pretrained(tmp_path / d)
        assert torch.allclose(loaded(*inputs, enc), after, atol=1e-5)
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert torch.allclose(model(*inputs, enc), after, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

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
