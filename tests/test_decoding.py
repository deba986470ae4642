"""decoding.py: the decode loop against transformers' generate, sampling, lock-step, graphs."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import decoding as D
import lora
import model as M


CORPUS = ['<think>Two objects.</think><answer>[{"label": "chair", "bbox_3d": [0.12, -1.5, 2.0, '
          '0.5, 0.5, 0.9, 0.0, 0.0, 0.0]}]</answer>'] * 20 + [
    "Frame-0: Frame-1: Detect the 3D bounding boxes of the first frame."] * 10
LONG = ("Frame-0: <image>Frame-1: <image>Frame-2: <image>Frame-3: <image>"
        "Detect the 3D bounding boxes.")
SHORT = "<image><image>Hi."


@pytest.fixture(scope="module")
def tok():
    return M.build_tiny_tokenizer(CORPUS, vocab_size=400)


def make_model(tok, vggt=True, seed=0, patch_size=14):
    torch.manual_seed(seed)
    return M.VGLLM(M.tiny_config(len(tok), vggt=vggt, patch_size=patch_size)).eval()


def mixed_batch(model, tok):
    """A left-padded batch of prompts of different lengths with 4 and 2 images; the first prompt
    twice with the same Encoding object (GRPO's repeated group: one shared prefill), so rows 0
    and 2 are one prefill copied."""
    rng = np.random.RandomState(0)
    frames = [rng.randint(0, 256, (4, 56, 56, 3), dtype=np.uint8),
              rng.randint(0, 256, (2, 56, 56, 3), dtype=np.uint8)]
    a, b = model.encode(frames)
    enc = [a, b, a]
    batch = model.prompt_batch(tok, [LONG, SHORT, LONG], enc)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt is left-padded
    return batch, enc


def completion_mask(completion, eos, pad):
    """1 up to and including the first EOS, 0 after it (written here, not taken from grpo.py)."""
    out = torch.zeros(completion.shape)
    for b, row in enumerate(completion.tolist()):
        for j, t in enumerate(row):
            out[b, j] = 1
            if t == eos:
                break
    return out


def forward_logp(model, batch, enc, completion, T):
    """forward()'s log-prob of every completion token [B, C] (tempered,
    suppressed tokens removed)."""
    P = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], completion], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(completion)], 1)
    types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    with torch.no_grad():
        return model(ids, mask, types, batch["image_grid_thw"], enc, temperature=T)[:, P - 1:]


def rig_eos(model, batch, enc, scale=1.5, n=12):
    """Make decoding end at different steps in different rows: EOS takes over one token that
    greedy picks (EOS's head row = scale x that token's), so a greedy row ends where it would
    have emitted it. Random-init logits are small (std ~0.2): sampling needs a larger scale
    for EOS to be drawn at all."""
    with torch.no_grad():
        free = model.generate(batch, enc, n, do_sample=False)
        eos = model.config["eos_token_id"]
        counts = torch.bincount(free[:, 2:].flatten(), minlength=len(model.qwen.lm_head.weight))
        # a token that is not the first of every row
        for token in counts.argsort(descending=True).tolist():
            ends = [(row == token).nonzero()[:1].flatten().tolist() for row in free]
            if len({e[0] if e else n for e in ends}) > 1 and all(e[0] > 0 for e in ends if e):
                break
        W = model.qwen.lm_head.weight
        W[eos] = scale * W[token]
    return token


# --------------------------------------------------------------------------------------------------
# greedy: exactly transformers' generate
# --------------------------------------------------------------------------------------------------

def transformers_greedy(model, batch, enc, n):
    """transformers' generate on the same inputs: tokens [B, n] and the log-prob of each
    under its processed scores."""
    gc = D.generation_config(model, n, do_sample=False)
    gc.output_scores = gc.return_dict_in_generate = True
    with torch.no_grad():
        out = model.qwen.generate(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
            generation_config=gc, **model.mm_inputs(batch["image_grid_thw"], enc))
    tokens = out.sequences[:, batch["input_ids"].shape[1]:]
    logp = torch.stack([torch.log_softmax(s.double(), -1).gather(1, tokens[:, j:j + 1])[:, 0]
                        for j, s in enumerate(out.scores)], 1)
    return tokens, logp


@pytest.mark.parametrize("vggt,patch_size", [(True, 14), (False, 14), (True, 7)])
def test_greedy_equals_transformers_generate(tok, vggt, patch_size):
    """The same tokens, and the same log-probs to 1e-5: a random-init model's argmax barely depends
    on the context, so the log-probs are what catches a wrong position, cache row or mask.
    (Patch 7: the tiny default's grid.)"""
    model = make_model(tok, vggt, patch_size=patch_size)
    batch, enc = mixed_batch(model, tok)
    ours, logp = model.generate(batch, enc, 10, do_sample=False, return_logprobs=True)
    ref, ref_logp = transformers_greedy(model, batch, enc, 10)
    assert ours.shape == ref.shape == (3, 10) and torch.equal(ours, ref)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)
    assert torch.equal(ours, D.hf_generate(model, batch, enc, 10, do_sample=False))
    assert torch.equal(ours[0], ours[2])  # the shared prefill serves both copies


def test_greedy_eos_and_padding_equal_transformers(tok):
    model = make_model(tok)
    batch, enc = mixed_batch(model, tok)
    rig_eos(model, batch, enc)
    eos, pad = model.config["eos_token_id"], model.config["pad_token_id"]
    ours = model.generate(batch, enc, 12, do_sample=False)
    ref = D.hf_generate(model, batch, enc, 12, do_sample=False)
    assert torch.equal(ours, ref)
    ends = [row.tolist().index(eos) if eos in row else None for row in ours]
    assert len(set(ends)) > 1  # rows end at different steps (or not at all)
    for row, end in zip(ours, ends):
        if end is not None:
            assert (row[end + 1:] == pad).all() and not (row[:end] == pad).any()
    # cut where the last row ended
    assert ours.shape[1] == max(12 if e is None else e + 1 for e in ends)


# --------------------------------------------------------------------------------------------------
# sampling: the sampler's log-probs are forward()'s
# --------------------------------------------------------------------------------------------------

def test_sampled_logprobs_equal_forward(tok):
    model = make_model(tok)
    batch, enc = mixed_batch(model, tok)
    rig_eos(model, batch, enc, scale=16)
    T = 0.7
    torch.manual_seed(0)
    completion, sampler_logp = model.generate(batch, enc, 12, temperature=T, return_logprobs=True)
    scored = forward_logp(model, batch, enc, completion, T)
    m = completion_mask(completion, model.config["eos_token_id"],
                        model.config["pad_token_id"]).bool()
    assert m.sum() > 10 and (~m).sum() > 0  # some rows ended early: padding is excluded
    torch.testing.assert_close(sampler_logp[m], scored[m], atol=1e-5, rtol=0)
    # and the sampler's log-prob is that of the plain tempered softmax,
    # computed here from full logits
    P = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], completion], 1)
    with torch.no_grad():
        logits = model.qwen(
            input_ids=ids,
            attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(completion)], 1),
            mm_token_type_ids=torch.cat([batch["mm_token_type_ids"],
                                         torch.zeros_like(completion)], 1),
            **model.mm_inputs(batch["image_grid_thw"], enc)).logits[:, P - 1:-1].double()
    logits[..., model.config["suppress_token_ids"]] = -float("inf")
    ref = torch.log_softmax(logits / T, -1).gather(-1, completion[..., None])[..., 0]
    torch.testing.assert_close(sampler_logp[m].double(), ref[m], atol=1e-5, rtol=0)


def test_suppressed_tokens_never_drawn_and_scored_alike(tok):
    """Rig the head so that, without the bias, vision/special tokens would win: generate must not
    emit them (greedy or sampled), and the sampler's log-probs must still equal forward()'s. Fails
    if either side drops the bias."""
    model = make_model(tok)
    batch, enc = mixed_batch(model, tok)
    suppressed = torch.tensor(model.config["suppress_token_ids"])
    with torch.no_grad():
        W = model.qwen.lm_head.weight
        W[suppressed] = 3 * W[suppressed] + 0.5 * torch.randn(len(suppressed), W.shape[1])
        free = model.qwen(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
            **model.mm_inputs(batch["image_grid_thw"], enc)).logits[:, -1]
    # unsuppressed, every first token would be a special one
    assert torch.isin(free.argmax(-1), suppressed).all()
    greedy = model.generate(batch, enc, 8, do_sample=False)
    torch.manual_seed(0)
    sampled, logp = model.generate(batch, enc, 8, temperature=1.0, return_logprobs=True)
    assert not torch.isin(greedy, suppressed).any() and not torch.isin(sampled, suppressed).any()
    m = completion_mask(sampled, model.config["eos_token_id"], model.config["pad_token_id"]).bool()
    torch.testing.assert_close(logp[m], forward_logp(model, batch, enc, sampled, 1.0)[m],
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# inverse-CDF sampling against hand-computed intervals
# --------------------------------------------------------------------------------------------------

def test_inverse_cdf_sample_by_hand():
    # intervals: 1 -> [0, .25), 3 -> [.25, .75), 4 -> [.75, 1)
    p = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]])
    # u = 1: torch.rand never draws it, but u * total may round up to the total: still the last
    # allowed token, never one past the end
    cases = {0.0: 1, 0.2499: 1, 0.25: 3, 0.7499: 3, 0.75: 4, 1 - 2 ** -53: 4, 1.0: 4}
    for u, want in cases.items():
        assert D.sample(p, torch.tensor([[u]], dtype=torch.float64)).item() == want, u
    # unnormalised rows (softmax in float32 rarely sums to exactly 1): u is a fraction of the total
    q = torch.tensor([[2.0, 0.0, 6.0], [0.0, 0.0, 3.0]])
    got = D.sample(q, torch.tensor([[0.2], [0.999]], dtype=torch.float64))
    assert got.tolist() == [0, 2]


def test_inverse_cdf_frequencies_match_probabilities():
    torch.manual_seed(0)
    p = torch.tensor([0.05, 0.0, 0.45, 0.2, 0.0, 0.3])
    n = 40000
    draws = D.sample(p.expand(n, -1), torch.rand(n, 1, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[1] == 0 and freq[4] == 0
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all(), freq


# --------------------------------------------------------------------------------------------------
# FSDP's lock-step: every rank runs the same number of decoding steps
# --------------------------------------------------------------------------------------------------

def _lockstep_worker(rank, init_file, vocab, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = M.VGLLM(M.tiny_config(vocab, vggt=False, patch_size=14)).eval()
        eos = model.config["eos_token_id"]
        # rank 0 can only emit EOS (every row ends at once), rank 1 never can: without the
        # all-reduce rank 0 would stop at the first check while rank 1 goes on (under FSDP: a
        # hang in rank 1's next all-gather)
        model.config["suppress_token_ids"] = ([i for i in range(vocab) if i != eos] if rank == 0
                                              else [eos])
        steps = []
        model.qwen.model.language_model.layers[0].register_forward_hook(lambda *_: steps.append(1))
        ids = torch.tensor([[20 + rank, 21, 22, 23]] * 2)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "mm_token_type_ids": torch.zeros_like(ids)}
        out = model.generate(batch, [], 30, temperature=1.0, synced_gpus=True)
        torch.save({"steps": len(steps), "completion": out},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_synced_gpus_every_rank_runs_the_same_steps(tok, tmp_path):
    # fork: the children start with everything imported (spawn would
    # re-import torch and transformers twice)
    mp.start_processes(_lockstep_worker, args=(str(tmp_path / "init"), len(tok), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 30  # the prefill and 29 decoding steps, on both ranks
    eos = M.tiny_config(len(tok))["eos_token_id"]
    # cut where its rows ended
    assert (r0["completion"][:, 0] == eos).all() and r0["completion"].shape == (2, 1)
    assert r1["completion"].shape == (2, 30) and not (r1["completion"] == eos).any()


# --------------------------------------------------------------------------------------------------
# the CUDA-graph path, as far as a CPU can check it
# --------------------------------------------------------------------------------------------------

def one_layer_model(tok):
    cfg = M.tiny_config(len(tok), patch_size=14)
    text = cfg["qwen"]["text_config"]
    # one layer: tracing takes seconds
    text["num_hidden_layers"], text["layer_types"] = 1, text["layer_types"][:1]
    torch.manual_seed(0)
    return M.VGLLM(cfg).eval()


def test_decode_step_is_one_graph_without_host_syncs(tok, monkeypatch):
    """A CUDA graph needs a step with no host sync and no Python branch on a tensor value. dynamo
    with fullgraph=True raises on either (a .item(), a bool(tensor), a data-dependent shape): trace
    the step with it and decode."""
    model = one_layer_model(tok)
    batch, enc = mixed_batch(model, tok)
    eager = model.generate(batch, enc, 6, do_sample=False)
    traced = torch.compile(D.decode_step, backend="eager", fullgraph=True)
    monkeypatch.setattr(D, "decode_step", traced)  # the loop now calls the traced step
    try:
        assert torch.equal(model.generate(batch, enc, 6, do_sample=False), eager)
    finally:
        torch._dynamo.reset()


def test_graph_buffers_are_reused_and_refilled(tok, monkeypatch):
    """The graph path on the CPU, with the eager step in place of the recorded graph: fixed
    buffers (cache rounded up to 256 slots), kept across calls and refilled each call; the tokens
    are those of the plain loop."""
    model = make_model(tok)
    batch, enc = mixed_batch(model, tok)
    plain = model.generate(batch, enc, 6, do_sample=False)
    torch.manual_seed(3)
    sampled = model.generate(batch, enc, 6, temperature=0.8)
    monkeypatch.setattr(D, "CUDA_GRAPHS", True)
    monkeypatch.setattr(D, "step_graph", lambda model, s: (lambda: D.decode_step(model, s)))
    assert torch.equal(model.generate(batch, enc, 6, do_sample=False), plain)
    key, first, _ = D._GRAPHS[model]
    assert first.kv.keys[0].shape[2] == 256
    # a shorter prompt
    other_batch, other_enc = model.prompt_batch(tok, [SHORT] * 3, enc[1:2] * 3), enc[1:2] * 3
    # same shapes after rounding: same buffers, refilled
    model.generate(other_batch, other_enc, 6, do_sample=False)
    assert D._GRAPHS[model][1] is first
    assert torch.equal(model.generate(batch, enc, 6, do_sample=False), plain)
    torch.manual_seed(3)
    # a new key: new buffers
    assert torch.equal(model.generate(batch, enc, 6, temperature=0.8), sampled)
    second = D._GRAPHS[model][1]
    assert second is not first
    model.config["suppress_token_ids"] = (model.config["suppress_token_ids"]
                                          + [model.config["eos_token_id"]])
    # one more suppressed token (bench.py's forced length)
    model.generate(batch, enc, 6, temperature=0.8)
    third = D._GRAPHS[model][1]
    assert third is not second
    # new parameter tensors: a graph of the old ones would read stale weights
    lora.apply_lora(model, rank=2, alpha=4)
    model.generate(batch, enc, 6, temperature=0.8)
    assert D._GRAPHS[model][1] is not third


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (the recorded-graph path)")
def test_cuda_graph_decoding_equals_eager_and_transformers(tok, monkeypatch):
    """On a GPU: the recorded graph decodes exactly what the eager loop and transformers'
    generate decode (greedy), twice (the second call replays the kept graph), and its
    sampled log-probs are forward()'s."""
    model = make_model(tok).cuda()
    batch, enc = mixed_batch(model, tok)
    batch = {k: v.cuda() for k, v in batch.items()}
    monkeypatch.setattr(D, "CUDA_GRAPHS", False)
    eager, eager_logp = model.generate(batch, enc, 10, do_sample=False, return_logprobs=True)
    monkeypatch.setattr(D, "CUDA_GRAPHS", True)
    for _ in range(2):
        graphed, logp = model.generate(batch, enc, 10, do_sample=False, return_logprobs=True)
        assert (torch.equal(graphed, eager)
                and torch.equal(graphed, D.hf_generate(model, batch, enc, 10, do_sample=False)))
        torch.testing.assert_close(logp, eager_logp, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    sampled, logp = model.generate(batch, enc, 10, temperature=0.7, return_logprobs=True)
    m = completion_mask(sampled.cpu(), model.config["eos_token_id"],
                        model.config["pad_token_id"]).bool().cuda()
    torch.testing.assert_close(logp[m], forward_logp(model, batch, enc, sampled, 0.7)[m],
                               atol=1e-4, rtol=0)
