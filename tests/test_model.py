"""model.py: configs, preprocessing and token order, tokenizer, prompts, forward, generate."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from transformers.vision_utils import get_vision_position_ids

import checkpoints as C
import decoding
import model as M
import train


CORPUS = ['<think>Two objects.</think><answer>[{"label": "chair", "bbox_3d": [0.12, -1.5, 2.0, '
          '0.5, 0.5, 0.9, 0.0, 0.0, 0.0]}, {"label": "table", "bbox_3d": [1.0, 0.3, 2.5, 1.2, 0.8, '
          '0.7, 0.1, 0.0, 0.0]}]</answer>'] * 20 + [
    "Frame-0: Frame-1: Detect the 3D bounding boxes in the camera coordinate system of the "
    "first frame. Output a json list where each entry contains the object name in \"label\" "
    "and its 3D bounding box."] * 10
PROMPT = ("Frame-0: <image>Frame-1: <image>Frame-2: <image>Frame-3: <image>"
          "Detect the 3D bounding boxes.")
# The fixtures tok, cfg and frames (shared with test_vggt, test_lora, test_checkpoints): conftest.py


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return M.VGLLM(cfg)


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
# the real configs at full size
# --------------------------------------------------------------------------------------------------

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
    groups = train.build_optimizer(model, train.get_args([])).param_groups
    llm, merger = (g["params"] for g in groups)
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
