"""grpo.py: the two training objectives of 3D-RFT and one optimiser step of each.

Stage 1, SFT: token-level cross-entropy on the answer tokens only (prompt and image tokens masked).
Stage 2, GRPO with verifiable rewards (Shao et al. 2024, DeepSeekMath; 3D-RFT, arXiv 2603.04976):

    for each prompt q (frames + text) sample G completions o_1..o_G ~ pi_old(. | q) at temperature T
    r_i    = R(q, o_i)                            the task's evaluation metric (rft3d.py)
    A_i    = (r_i - mean(r)) / (std(r) + 1e-4)    one advantage per completion, shared by its tokens
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    L_it   = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)  +  beta * KL3_it
    KL3_it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1             (Schulman's k3 estimator)
    L      = sum_{i,t} L_it / (number of completion tokens in the whole optimiser batch)

One code path for 1 CPU process and N GPUs (DDP or FSDP2): a rank owns whole prompt groups; the
only communication added is the `dist.all_reduce` of token counts and logged statistics. Pitfalls
and the choices behind each line: DESIGN.md section 6.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------------
# Small helpers: the distributed world and the unwrapped module


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def unwrap(policy):
    """DDP keeps the model in .module; FSDP2 shards it in place."""
    return policy.module if hasattr(policy, "module") else policy


def grad_sync(policy, enabled):
    """All-reduce gradients on the last micro-step only (DDP's no_sync, FSDP2's spelling)."""
    if hasattr(policy, "require_backward_grad_sync"):  # DDP
        policy.require_backward_grad_sync = enabled
    elif hasattr(policy, "set_requires_gradient_sync"):  # FSDP2
        policy.set_requires_gradient_sync(enabled)


# --------------------------------------------------------------------------------------------------
# Sequences: prompt (left-padded, with image pads) + completion (right-padded), and the loss mask


def completion_mask(completion, eos_id, pad_id):
    """1 up to and including the first EOS (the action 'stop'), 0 after it and on padding."""
    is_eos = completion == eos_id  # [N, C]
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos & (completion != pad_id)).float()  # pad != eos: the EOS is never masked


def sequence_batch(model, tokenizer, prompts, encodings, completion):
    """-> (model.forward batch of prompt + completion [N, P + C], loss mask [N, P + C - 1])."""
    batch = model.prompt_batch(tokenizer, prompts, encodings)  # left-padded [N, P], on the CPU
    batch = {k: v.to(completion.device) for k, v in batch.items()}
    P = batch["input_ids"].shape[1]
    cmask = completion_mask(completion, tokenizer.eos_token_id, tokenizer.pad_token_id)  # [N, C]
    batch["input_ids"] = torch.cat([batch["input_ids"], completion], 1)  # [N, P + C]
    batch["attention_mask"] = torch.cat([batch["attention_mask"], cmask.long()], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"],
                                            torch.zeros_like(completion)], 1)
    # logp[:, t] scores token t + 1: completion token P + j is scored at P + j - 1 (the LM shift)
    mask = torch.cat([cmask.new_zeros(cmask.shape[0], P - 1), cmask], 1)  # [N, P + C - 1]
    batch["first_position"] = P - 1  # model.forward skips the prompt's log-probs: nobody uses them
    return batch, mask


def pad_right(seqs, pad_id):
    """list of token-id lists -> LongTensor [N, max_len] padded on the right."""
    out = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------------
# Stage 1: SFT


def sft_step(policy, tokenizer, task, samples, optimizer, micro_batch, max_grad_norm=1.0):
    """One optimiser step of cross-entropy on the answer tokens, a global token mean (as GRPO)."""
    t0, model = time.time(), unwrap(policy)
    device = next(model.parameters()).device
    # 1. Encode each sample's frames once; targets end with the chat EOS.
    encodings = model.encode([s.frames for s in samples])
    prompts = [task.prompt(s, think=True) for s in samples]
    targets = [tokenizer(task.target(s), add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for s in samples]
    # 2. N = answer tokens over all ranks: every micro-batch divides by the same N.
    n_tokens = all_reduce_sum(torch.tensor(float(sum(map(len, targets))), device=device)).item()
    # 3. Micro-batches of -sum(logp * mask) / N; DDP/FSDP average over ranks: * world size.
    model.train()
    total, n_micro = 0.0, math.ceil(len(samples) / micro_batch)
    for k in range(n_micro):
        sl = slice(k * micro_batch, (k + 1) * micro_batch)
        completion = pad_right(targets[sl], tokenizer.pad_token_id).to(device)
        batch, mask = sequence_batch(model, tokenizer, prompts[sl], encodings[sl], completion)
        grad_sync(policy, k == n_micro - 1)
        logp = policy(**batch, encodings=encodings[sl])  # [n, L - 1]
        loss = -(logp * mask.to(logp.dtype)).sum() / n_tokens * world_size()
        loss.backward()
        total += loss.item() / world_size()
    grad_norm, skipped = finish_step(policy, optimizer, total, max_grad_norm)
    return {"loss": all_reduce_sum(torch.tensor(total, device=device)).item(),
            "grad_norm": grad_norm, "skipped": int(skipped), "answer_tokens": n_tokens,
            "step_time": time.time() - t0}


def finish_step(policy, optimizer, loss_value, max_grad_norm):
    """Clip and step, or, if the loss or gradient norm is non-finite on any rank, skip on all."""
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # total norm before clipping
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    bad = float(not (math.isfinite(loss_value) and math.isfinite(grad_norm)))
    # every rank together: a rank that stepped alone would desynchronise the replicas
    skipped = all_reduce_sum(torch.tensor(bad, device=params[0].device)).item() > 0
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


# --------------------------------------------------------------------------------------------------
# Stage 2: GRPO, the pieces


def group_advantages(rewards, G, scale="group"):
    """rewards [B * G] -> (A [B * G], constant [B]): A_i = (r_i - mean) / (std + 1e-4) per group."""
    r = rewards.view(-1, G)  # [B, G]
    # a group of equal rewards gets A = 0 exactly, decided on r itself: the float32 mean of equal
    # values can be one ulp off, and (r - mean) / 1e-4 would then be +-0.002 of one sign
    constant = (r == r[:, :1]).all(1)  # [B]
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":  # GRPO
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":  # one std over this rank's batch
        centred = centred / (rewards.std() + 1e-4)
    elif scale != "none":  # none: Dr. GRPO, no std division
        raise ValueError(f"unknown advantage scale {scale!r}")
    return centred.masked_fill(constant[:, None], 0.0).reshape(-1), constant


def grpo_loss(logp, logp_old, logp_ref, adv, mask, *, eps_low, eps_high, beta, agg, n_tokens,
              n_seqs, max_len):
    """One micro-batch's share of L ([n, T] inputs, adv [n]) -> (loss, summed stats).

    n_tokens, n_seqs: counts over the whole optimiser batch (all micro-batches and ranks), so the
    micro-batch losses sum to the global L:  token sum_it L_it / n_tokens (3D-RFT, DAPO);  seq
    sum_i mean_t L_it / n_seqs (GRPO);  drgrpo sum_it L_it / (n_seqs max_len) (Dr. GRPO)."""
    A = adv[:, None]  # [n, 1]: one advantage per completion, broadcast over its tokens
    ratio = torch.exp(logp - logp_old)  # rho
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)  # [n, T]
    kl = torch.zeros_like(logp)
    if beta > 0:
        d = logp_ref - logp  # log(pi_ref / pi_theta)
        kl = torch.exp(d) - d - 1  # k3 >= 0, unbiased for KL(pi_theta || pi_ref)
        per_token = per_token + beta * kl
    if agg == "token":
        loss = (per_token * mask).sum() / n_tokens
    elif agg == "seq":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif agg == "drgrpo":
        loss = (per_token * mask).sum() / (n_seqs * max_len)
    else:
        raise ValueError(f"unknown aggregation {agg!r}")
    with torch.no_grad():  # sums over this micro-batch, for the logs: no graph
        clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        stats = {"kl": (kl * mask).sum().item(), "clip_frac": (clipped * mask).sum().item(),
                 "ratio": (ratio * mask).sum().item()}
    return loss, stats


@torch.no_grad()
def logprobs_no_grad(net, batches, temperature):
    """log pi of each micro-batch's completion tokens without grad (old policy or reference)."""
    return [net(**b, encodings=enc, temperature=temperature) for b, enc in batches]


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO's hyper-parameters; train.py builds one from its flags (`python train.py -h`)."""
    G: int = 8  # completions per prompt
    temperature: float = 1.0  # T, of sampling and of the scored log-probs alike
    max_new_tokens: int = 256
    beta: float = 0.04  # k3 KL weight (0: no reference model)
    eps_low: float = 0.2
    eps_high: float = 0.2
    mu: int = 1  # optimiser updates per rollout
    adv_scale: str = "group"  # group | batch | none
    agg: str = "token"  # token | seq | drgrpo
    micro_batch: int = 16
    max_grad_norm: float = 1.0
    reward_opts: dict = field(default_factory=dict)  # task.reward's options, e.g. iou_mode
    synced_gpus: bool = False  # FSDP: every rank runs as many decoding forwards
    sampler: Callable | None = None  # None: model.generate; --rollout vllm: rollout_vllm.sampler


# --------------------------------------------------------------------------------------------------
# Stage 2: one GRPO step


def grpo_step(policy, ref, tokenizer, task, samples, optimizer, hp: GRPOConfig):
    """One rollout of this rank's prompts and hp.mu updates on it -> (stats, completion texts)."""
    t0, model, G, T = time.time(), unwrap(policy), hp.G, hp.temperature
    device = next(model.parameters()).device

    # 1. Encode each prompt's frames ONCE (frozen encoders): for all G samples and every pass.
    encodings = model.encode([s.frames for s in samples])  # B encodings
    enc_G = [e for e in encodings for _ in range(G)]  # [B * G] references, not copies
    prompts_G = [task.prompt(s, think=True) for s in samples for _ in range(G)]
    samples_G = [s for s in samples for _ in range(G)]

    # 2. Rollout o_1..o_G ~ pi_old(. | q) at temperature T, dropout off.
    model.eval()
    with torch.no_grad():
        batch = model.prompt_batch(tokenizer, prompts_G, enc_G)
        completion = (hp.sampler or model.generate)(  # [B * G, C]
            batch, enc_G, max_new_tokens=hp.max_new_tokens, temperature=T, do_sample=True,
            synced_gpus=hp.synced_gpus)
    t_rollout = time.time() - t0

    # 3. Rewards r_i = R(q, o_i): the task's metric on the decoded (untrusted) text.
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    parts = [task.reward(s, t, **hp.reward_opts) for s, t in zip(samples_G, texts)]
    r = torch.tensor([p["total"] for p in parts], dtype=torch.float32, device=device)  # [B*G]

    # 4. Group-normalised advantages A_i; the groups without signal.
    A, constant = group_advantages(r, G, hp.adv_scale)  # [B * G], [B]

    # 5. Micro-batches of whole sequences; token and sequence counts over all ranks.
    slices = [slice(k, k + hp.micro_batch) for k in range(0, len(enc_G), hp.micro_batch)]
    batches = [(*sequence_batch(model, tokenizer, prompts_G[sl], enc_G[sl], completion[sl]),
                enc_G[sl]) for sl in slices]  # (batch, mask, encodings)
    n_tokens = all_reduce_sum(sum(m.sum() for _, m, _ in batches).detach().clone()).item()
    n_seqs = len(enc_G) * world_size()

    # 6. log pi_old (mu > 1; else pi_old = pi_theta: logp.detach()) and log pi_ref, no grad.
    model.train()  # zero dropout: scores exactly as sampling did
    fwd = [(b, enc) for b, _, enc in batches]
    logp_old = logprobs_no_grad(policy, fwd, T) if hp.mu > 1 else None
    logp_ref = logprobs_no_grad(ref, fwd, T) if hp.beta > 0 else None

    # 7. mu updates of L; DDP/FSDP average gradients over ranks, hence * world_size.
    stats = {"kl": 0.0, "clip_frac": 0.0, "ratio": 0.0, "entropy": 0.0}
    skipped = 0
    for it in range(hp.mu):
        total_loss = 0.0
        for k, (b, mask, enc) in enumerate(batches):
            grad_sync(policy, k == len(batches) - 1)
            logp, entropy = policy(**b, encodings=enc, temperature=T, return_entropy=True)
            loss, sums = grpo_loss(
                logp, logp.detach() if logp_old is None else logp_old[k],  # [n, L - 1]
                None if logp_ref is None else logp_ref[k], A[slices[k]], mask,
                eps_low=hp.eps_low, eps_high=hp.eps_high, beta=hp.beta, agg=hp.agg,
                n_tokens=n_tokens, n_seqs=n_seqs, max_len=hp.max_new_tokens)
            (loss * world_size()).backward()
            total_loss += loss.item()
            if it == 0:  # KL and entropy before any update, as the rollout saw them
                stats["kl"] += sums["kl"]
                stats["entropy"] += (entropy * mask).sum().item()
            if it == hp.mu - 1:  # rho and clip fraction after mu - 1 updates
                stats["ratio"] += sums["ratio"]
                stats["clip_frac"] += sums["clip_frac"]
        grad_norm, skip = finish_step(policy, optimizer, total_loss, hp.max_grad_norm)
        skipped += skip

    # 8. Logged statistics, averaged over all ranks.
    out = step_stats(completion, tokenizer, r, parts, constant, stats, total_loss, G, n_tokens,
                     n_seqs)
    return {**out, "grad_norm": grad_norm, "skipped": skipped, "completion_tokens": n_tokens,
            "step_time": time.time() - t0, "rollout_time": t_rollout,
            "tokens_per_s": n_tokens / max(time.time() - t0, 1e-9)}, texts


def step_stats(completion, tokenizer, rewards, parts, constant, stats, loss, G, n_tokens, n_seqs):
    """This rank's sums, all-reduced as one float64 vector, then per group, per completion token
    (kl, clip_frac, ratio, entropy) or per completion; "loss" stays a sum (each rank's share)."""
    cmask = completion_mask(completion, tokenizer.eos_token_id, tokenizer.pad_token_id)
    local = {
        "loss": loss,
        "reward": rewards.sum().item(),
        "reward_std": rewards.view(-1, G).std(1).sum().item(),
        "zero_std_frac": constant.sum().item(),
        "completion_len": cmask.sum().item(),
        "truncated": (~(completion == tokenizer.eos_token_id).any(1)).float().sum().item(),
        **{f"reward_{k}": sum(p[k] for p in parts) for k in parts[0] if k != "total"},
        **stats,
    }
    keys = sorted(local)
    summed = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=rewards.device)
    tok = max(n_tokens, 1)
    per = {"loss": 1, "reward_std": n_seqs / G, "zero_std_frac": n_seqs / G, "kl": tok,
           "clip_frac": tok, "ratio": tok, "entropy": tok}  # the rest: per completion
    return {k: v / per.get(k, n_seqs) for k, v in zip(keys, all_reduce_sum(summed).tolist())}
