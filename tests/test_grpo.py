"""grpo.py: the GRPO loss against float64 re-derivations, and steps on the real model."""
import math
import os

import pytest
import torch

import checkpoints
import decoding
import grpo
import rft3d
import scenes
from test_safety import varied


def reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, max_len):
    """The objective written out token by token in float64, straight from the formula."""
    n, T = logp.shape
    total = torch.zeros((), dtype=torch.float64)
    n_tokens = sum(float(mask[i, t]) for i in range(n) for t in range(T))
    for i in range(n):
        seq = torch.zeros((), dtype=torch.float64)
        count = 0.0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            clipped = min(max(rho.item(), 1 - eps_low), 1 + eps_high)
            # -min(rho A, clip(rho) A): pick the branch by value, keep
            # rho's gradient on the unclipped one
            term = (-(rho * a) if rho * a <= clipped * a
                    else -(torch.tensor(clipped, dtype=torch.float64) * a) + 0 * rho)
            if beta > 0:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            seq = seq + term
            count += 1
        if agg == "seq":
            total = total + (seq / max(count, 1)) / n
        else:
            total = total + seq
    if agg == "token":
        return total / n_tokens
    if agg == "drgrpo":
        return total / (n * max_len)
    return total


def random_inputs(seed, n=6, T=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    # ratios well outside [0.8, 1.2]
    old = logp + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(n, T, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, T, generator=g) > 0.3).double()
    mask[0] = 0  # an empty sequence must not divide by zero in 'seq' mode
    mask[1, 0] = 1
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", ["token", "seq", "drgrpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_and_gradient_match_float64_rederivation(agg, beta, eps):
    logp64, old, ref, adv, mask = random_inputs(seed=hash((agg, beta, eps)) % 1000)
    n, T = logp64.shape
    lp32 = logp64.float().clone().requires_grad_(True)
    loss, stats = grpo.grpo_loss(lp32, old.float(), ref.float(), adv.float(), mask.float(),
                                 eps_low=eps[0], eps_high=eps[1], beta=beta, agg=agg,
                                 n_tokens=mask.sum().item(), n_seqs=n, max_len=T)
    loss.backward()
    lp64 = logp64.clone().requires_grad_(True)
    expected = reference_loss(lp64, old, ref, adv, mask, eps[0], eps[1], beta, agg, T)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-4, atol=1e-6)
    assert 0 < stats["clip_frac"] < mask.sum()  # the inputs do exercise the clip


def test_micro_batches_sum_to_the_global_token_mean():
    """Splitting a batch into micro-batches with global counts gives the same loss and gradient
    (no double division under gradient accumulation)."""
    logp, old, ref, adv, mask = random_inputs(seed=3, n=8)
    full = logp.clone().requires_grad_(True)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.04, agg="token", n_tokens=mask.sum().item(),
              n_seqs=8, max_len=9)
    whole, _ = grpo.grpo_loss(full, old, ref, adv, mask, **kw)
    whole.backward()
    parts = logp.clone().requires_grad_(True)
    total = 0
    for sl in (slice(0, 3), slice(3, 8)):
        part, _ = grpo.grpo_loss(parts[sl], old[sl], ref[sl], adv[sl], mask[sl], **kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(parts.grad, full.grad)


def test_ratio_one_gives_plain_policy_gradient():
    """With mu = 1, logp_old = logp.detach(): ratio 1, gradient -A / N per token, no clipping."""
    logp, _, ref, adv, mask = random_inputs(seed=5)
    lp = logp.clone().requires_grad_(True)
    loss, stats = grpo.grpo_loss(lp, lp.detach(), ref, adv, mask, eps_low=0.2, eps_high=0.2,
                                 beta=0.0, agg="token", n_tokens=mask.sum().item(), n_seqs=6,
                                 max_len=9)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv[:, None].expand_as(mask) * mask / mask.sum())
    assert stats["clip_frac"] == 0 and stats["ratio"] == pytest.approx(mask.sum().item())


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a, constant = grpo.group_advantages(r, G=3, scale="group")
    assert constant.tolist() == [False, True]
    s = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2)  # unbiased std of (1, 2, 3)
    torch.testing.assert_close(a, torch.tensor([-1 / (s + 1e-4), 0, 1 / (s + 1e-4), 0, 0, 0]))
    assert torch.equal(grpo.group_advantages(r, 3, "none")[0], torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    with pytest.raises(ValueError):
        grpo.group_advantages(r, 3, "nope")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_advantages(scale):
    """G equal rewards: advantages exactly 0 and the group counted as constant, for values whose
    float32 group mean is not exact (0.1, 1/3, 1.9, 0.7...: (r - mean) is then +-1 ulp, and
    / (std + 1e-4) made it +-0.002, all of one sign). The second group varies, so the batch std
    is not 0 either."""
    g = torch.Generator().manual_seed(0)
    values = [0.1, 1 / 3, 0.7, 1.9, 2.0 / 3, 1.3, 0.01] + torch.rand(20, generator=g).tolist()
    for v in values:
        for G in (3, 5, 7, 8, 16):
            r = torch.tensor([v] * G + [0.0] * (G - 1) + [1.0], dtype=torch.float32)
            adv, constant = grpo.group_advantages(r, G, scale)
            assert torch.equal(adv[:G], torch.zeros(G)), (v, G, adv[:G])
            assert constant.tolist() == [True, False]
            assert (adv[G:] != 0).any()


def test_zero_std_group_gives_exactly_zero_policy_gradient():
    logp, old, ref, _, mask = random_inputs(seed=7, n=4)
    adv, _ = grpo.group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), G=4)
    assert torch.equal(adv, torch.zeros(4))
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo.grpo_loss(lp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                             agg="token", n_tokens=mask.sum().item(), n_seqs=4, max_len=9)
    loss.backward()
    assert torch.count_nonzero(lp.grad) == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_with_finite_loss_is_skipped(bad):
    """An overflowing backward (finite loss, inf or NaN gradient) is skipped: the
    weights and the optimiser state stay as they were, the step says skipped, and the
    next finite step goes through."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.ones(1, 3)).sum()
    loss.backward()
    net.weight.grad[0, 0] = bad
    norm, skipped = grpo.finish_step(net, opt, loss.item(), max_grad_norm=1.0)
    assert skipped and not math.isfinite(norm)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before)) and not opt.state
    assert all(p.grad is None for p in net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    norm, skipped = grpo.finish_step(net, opt, 1.0, max_grad_norm=1.0)
    assert not skipped and math.isfinite(norm)
    assert not torch.equal(net.weight, before[0])


def test_completion_mask_keeps_eos_and_drops_what_follows():
    eos, pad = 5, 0
    c = torch.tensor([[7, 8, eos, pad, pad],   # stopped: EOS counts, padding does not
                      [7, eos, 9, eos, 9],     # anything after the first EOS is masked
                      [7, 8, 9, 9, 9]])        # truncated: no EOS, all tokens count
    m = grpo.completion_mask(c, eos, pad)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# ---- GRPO pitfalls on the real model -------------------------------------------------------------


def test_step0_ratio_is_one_and_kl_is_zero(init_dir):
    """Policy == reference and pi_old == pi_theta at step 0, dropout off: ratio exactly
    1, KL exactly 0 (mu = 2 stores logp_old from a separate no-grad pass, so this
    compares two different forwards)."""
    net, tok = checkpoints.load_pretrained(init_dir)
    ref, _ = checkpoints.load_pretrained(init_dir)
    ref.requires_grad_(False).eval()
    samples = [scenes.SyntheticDataset("detection", 4, seed=5, frames=2)[i] for i in range(2)]
    hp = grpo.GRPOConfig(G=3, temperature=0.7, max_new_tokens=12, beta=0.1, mu=2, micro_batch=4)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.0)
    out, texts = grpo.grpo_step(net, ref, tok, rft3d.TASKS["detection"], samples, opt, hp)
    assert out["ratio"] == 1.0 and out["kl"] == 0.0 and out["clip_frac"] == 0.0
    assert out["completion_tokens"] > 0 and len(texts) == 6


def test_sampling_logprobs_equal_scoring_logprobs(init_dir):
    """The distribution the tokens were sampled from (transformers' processed scores at
    temperature T) equals what model.forward scores at the same T: no temperature
    mismatch, no off-by-one shift."""
    net, tok = checkpoints.load_pretrained(init_dir)
    net.eval()
    samples = [scenes.SyntheticDataset("grounding", 2, seed=1, frames=2)[i] for i in range(2)]
    enc = net.encode([s.frames for s in samples])
    prompts = [rft3d.TASKS["grounding"].prompt(s, think=True) for s in samples]
    batch = net.prompt_batch(tok, prompts, enc)
    T = 0.6
    torch.manual_seed(0)
    with torch.no_grad():
        out = net.qwen.generate(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
            generation_config=decoding.generation_config(net, 10, T), output_scores=True,
            return_dict_in_generate=True, **net.mm_inputs(batch["image_grid_thw"], enc))
    P = batch["input_ids"].shape[1]
    completion = out.sequences[:, P:]
    sampled = torch.stack([torch.log_softmax(s.float(), -1).gather(1, completion[:, j:j + 1])[:, 0]
                           for j, s in enumerate(out.scores)], 1)  # [B, C]
    seq, mask = grpo.sequence_batch(net, tok, prompts, enc, completion)
    with torch.no_grad():
        scored = net(**seq, encodings=enc, temperature=T)[:, P - 1:]
    m = mask[:, P - 1:].bool()
    assert m.sum() > 0
    torch.testing.assert_close(scored[m], sampled[m], atol=2e-5, rtol=1e-5)


def test_mu_above_one_logs_the_ratio_of_the_last_pass(init_dir):
    net, tok = checkpoints.load_pretrained(init_dir)
    samples = [scenes.SyntheticDataset("detection", 4, seed=5, frames=2)[i] for i in range(2)]
    task = rft3d.TASKS["detection"]._replace(reward=varied)
    hp = grpo.GRPOConfig(G=4, max_new_tokens=12, beta=0.0, mu=3, micro_batch=8)
    torch.manual_seed(0)
    out, _ = grpo.grpo_step(net, None, tok, task, samples,
                            torch.optim.SGD(net.trainable_parameters(), lr=50.0), hp)
    # after 2 updates the policy is no longer the one that sampled (pass 0 logs 1 always)
    assert out["ratio"] != 1.0


# ---- distributed: each rank bound to its GPU, a non-finite gradient on one rank ------------------


def _one_rank_nonfinite_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks, as DDP would hold them
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        before = [p.detach().clone() for p in net.parameters()]
        seen = []
        for bad_rank in (1, None):  # step 1: rank 1's gradient alone is NaN; step 2: all finite
            for p in net.parameters():
                p.grad = torch.full_like(p, math.nan if rank == bad_rank else 1.0)
            _, skipped = grpo.finish_step(net, opt, 1.0, max_grad_norm=1.0)
            seen.append((skipped, all(torch.equal(a, b) for a, b in zip(before, net.parameters()))))
        torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Two gloo ranks with local gradients (FSDP's shards, or a rank whose loss overflowed): rank
    1's gradient is NaN, rank 0's finite. Both ranks skip (a rank that stepped alone would
    desynchronise the replicas) and keep their weights; the next, finite step moves both."""
    import torch.multiprocessing as mp
    mp.start_processes(_one_rank_nonfinite_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert seen == [(True, True), (False, False)], rank
