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

Everything here runs identically on 1 CPU process and on N GPUs under DDP or FSDP2: each rank owns
whole prompt groups, and the only communication we add is the visible `dist.all_reduce` of token
counts (so the token mean is global) and of logged statistics.
"""
import math
import os
import time

import torch
import torch.distributed as dist

import rollout_vllm  # train.py --rollout vllm (machinery; vLLM is imported only then)

# --------------------------------------------------------------------------------------------------
# Small helpers: the distributed world and the unwrapped module


def setup_distributed():
    """-> (rank, world size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
    `python train.py` is one process without a process group. On GPUs each rank is bound to
    cuda:LOCAL_RANK *before* the process group starts (and the group is told the device): otherwise
    every rank's NCCL collectives and CUDA graphs land on cuda:0. train.py and eval.py both start
    here."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # SFT warm-up and GRPO run in one process: initialise once
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(x):
    """Sum a tensor over ranks (a no-op on one process). Used for token counts and logged stats."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def unwrap(policy):
    """DDP keeps the model in .module; FSDP2 shards the model in place, so it is its own module."""
    return policy.module if hasattr(policy, "module") else policy


def grad_sync(policy, enabled):
    """Gradient all-reduce only on the last micro-step of an optimiser step: the others accumulate
    locally. (This is what DDP.no_sync() does; FSDP2 spells it set_requires_gradient_sync.)"""
    if hasattr(policy, "require_backward_grad_sync"):  # DDP
        policy.require_backward_grad_sync = enabled
    elif hasattr(policy, "set_requires_gradient_sync"):  # FSDP2
        policy.set_requires_gradient_sync(enabled)


# --------------------------------------------------------------------------------------------------
# Sequences: prompt (left-padded, with image pads) + completion (right-padded), and the loss mask


def completion_mask(completion, eos_id, pad_id):
    """1 on completion tokens up to and including the first EOS, 0 after it and on padding.
    The EOS stays in the loss: it is the action 'stop here', rewarded like any other token.
    pad != eos in our tokenizers, so masking padding can never mask the EOS (a classic pitfall)."""
    is_eos = completion == eos_id  # [N, C]
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos & (completion != pad_id)).float()


def sequence_batch(model, tokenizer, prompts, encodings, completion):
    """Concatenate prompts and completions into one batch for a single forward pass.

    completion: [N, C] token ids. Returns (batch for model.forward, mask [N, P + C - 1]) where the
    mask lines up with model.forward's log-probs: logp[:, t] scores token t + 1, so the completion
    token at position P + j is scored by logp[:, P + j - 1] (the off-by-one that shifts every causal
    LM loss)."""
    batch = model.prompt_batch(tokenizer, prompts, encodings)  # left-padded [N, P], on the CPU
    batch = {k: v.to(completion.device) for k, v in batch.items()}
    P = batch["input_ids"].shape[1]
    cmask = completion_mask(completion, tokenizer.eos_token_id, tokenizer.pad_token_id)  # [N, C]
    batch["input_ids"] = torch.cat([batch["input_ids"], completion], 1)  # [N, P + C]
    batch["attention_mask"] = torch.cat([batch["attention_mask"], cmask.long()], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"],
                                            torch.zeros_like(completion)], 1)
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
    """One optimiser step of masked cross-entropy on the answer tokens, a global token mean over the
    whole optimiser batch (all micro-batches, all ranks) - the same normalisation as GRPO below."""
    model = unwrap(policy)
    device = next(model.parameters()).device
    # 1. Encode every sample's frames once (frozen vision tower + VGGT); targets end with the chat
    #    EOS.
    encodings = model.encode([s.frames for s in samples])
    prompts = [task.prompt(s, think=True) for s in samples]
    targets = [tokenizer(task.target(s), add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for s in samples]
    # 2. Count answer tokens over all ranks first, so every micro-batch is divided by the same
    #    global N.
    n_tokens = all_reduce_sum(torch.tensor(float(sum(map(len, targets))), device=device)).item()
    # 3. Micro-batches: forward, -sum(logp * mask) / N, backward (gradient sync on the last one
    #    only). DDP/FSDP average gradients over ranks, so multiply by the world size to get the
    #    global sum / N.
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
            "grad_norm": grad_norm, "skipped": int(skipped), "answer_tokens": n_tokens}


def finish_step(policy, optimizer, loss_value, max_grad_norm):
    """Clip, then step, unless the loss or the gradient norm is non-finite on any rank: then every
    rank skips together (a rank that stepped alone would desynchronise the replicas) and the weights
    never see the step. A finite loss can still overflow in backward (bf16 at real size):
    clip_grad_norm_ would then scale the gradients by max_norm / inf and AdamW would write NaN into
    the weights. Returns (grad_norm, skipped)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # total norm before clipping
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    bad = float(not (math.isfinite(loss_value) and math.isfinite(grad_norm)))
    skipped = all_reduce_sum(torch.tensor(bad, device=params[0].device)).item() > 0
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


# --------------------------------------------------------------------------------------------------
# Stage 2: GRPO, the pieces


def group_advantages(rewards, G, scale="group"):
    """rewards [N = B * G] (G consecutive completions per prompt) -> (advantages [N], constant [B]).

    group: (r - mean_group) / (std_group + 1e-4)    GRPO (std is torch's unbiased estimate)
    batch: (r - mean_group) / (std_batch + 1e-4)    a batch-level scale (this rank's batch)
    none:  (r - mean_group)                         Dr. GRPO: no std division, no difficulty bias
    A group whose G rewards are equal gets A = 0 exactly: no policy gradient (only the KL term
    acts). Equality is decided on the rewards themselves, not on a float std: in float32 the mean of
    G equal values is often off by one ulp, and (r - mean) / (1e-8 + 1e-4) then gives advantages of
    +-0.002, all of one sign. constant is a bool mask of the groups that carry no signal."""
    r = rewards.view(-1, G)  # [B, G]
    constant = (r == r[:, :1]).all(1)  # [B]: the groups that carry no signal
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}")
    return centred.masked_fill(constant[:, None], 0.0).reshape(-1), constant


def grpo_loss(logp, logp_old, logp_ref, adv, mask, eps_low, eps_high, beta, agg, n_tokens, n_seqs,
              max_len):
    """The per-micro-batch GRPO loss. logp, logp_old, logp_ref, mask: [n, T]; adv: [n].

    n_tokens, n_seqs: completion tokens and sequences in the whole optimiser batch (all
    micro-batches, all ranks), so that summing these micro-batch losses gives the global
    normalisation:
      token:  sum_{i,t} L_it / n_tokens             (3D-RFT, DAPO: every token weighs the same)
      seq:    sum_i (mean_t L_it) / n_seqs          (original GRPO: every sequence weighs the same)
      drgrpo: sum_{i,t} L_it / (n_seqs * max_len)   (Dr. GRPO: a constant, no length bias)
    Returns (loss, stats) where stats are sums over this micro-batch for logging."""
    A = adv[:, None]  # [n, 1]: one advantage per completion, broadcast over its tokens
    ratio = torch.exp(logp - logp_old)  # rho
    surrogate = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)  # [n, T]
    per_token = surrogate
    kl = torch.zeros_like(logp)
    if beta > 0:
        d = logp_ref - logp  # log(pi_ref / pi_theta)
        # k3 >= 0, unbiased for KL(pi_theta || pi_ref) under pi_theta samples
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if agg == "token":
        loss = (per_token * mask).sum() / n_tokens
    elif agg == "seq":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif agg == "drgrpo":
        loss = (per_token * mask).sum() / (n_seqs * max_len)
    else:
        raise ValueError(f"unknown aggregation {agg!r}")
    with torch.no_grad():  # clipped: where the clip acts
        clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        stats = {"kl": (kl * mask).sum().item(), "clip_frac": (clipped * mask).sum().item(),
                 "ratio": (ratio * mask).sum().item()}
    return loss, stats


@torch.no_grad()
def logprobs_no_grad(net, batches, temperature):
    """Log-probs of the completion tokens of each micro-batch, no grad (old policy or reference)."""
    return [net(**b, encodings=enc, temperature=temperature) for b, enc in batches]


# --------------------------------------------------------------------------------------------------
# Stage 2: one GRPO step


def grpo_step(policy, ref, tokenizer, task, samples, optimizer, args):
    """One rollout and mu optimiser updates on it. `samples` are this rank's prompts; every rank
    holds the same number, so every rank runs the same number of generate calls and micro-steps.
    args: G, temperature, max_new_tokens, beta, eps_low, eps_high, mu, adv_scale, agg, micro_batch,
    max_grad_norm, reward_opts (dict passed to task.reward, e.g. iou_mode), fsdp (generation must
    stay in lock-step across ranks)."""
    t0, model, G, T = time.time(), unwrap(policy), args.G, args.temperature
    device = next(model.parameters()).device

    # 1. Encode each prompt's frames ONCE: the vision tower and VGGT are frozen, so their outputs
    #    serve all G samples, the old/reference log-probs and the policy forward (encode-once).
    encodings = model.encode([s.frames for s in samples])  # B encodings
    prompts = [task.prompt(s, think=True) for s in samples]
    enc_G = [e for e in encodings for _ in range(G)]  # [B * G] references, not copies
    prompts_G = [p for p in prompts for _ in range(G)]
    samples_G = [s for s in samples for _ in range(G)]

    # 2. Rollout o_1..o_G ~ pi_old(. | q) at temperature T (top_p 1, top_k 0), dropout off. Under
    #    FSDP every rank must run as many forward passes (synced_gpus), or early finishers hang.
    model.eval()
    with torch.no_grad():
        batch = model.prompt_batch(tokenizer, prompts_G, enc_G)
        generate = (model.generate if getattr(args, "rollout", "own") == "own"
                    else rollout_vllm.sampler(model, tokenizer, args))  # a vLLM engine: machinery
        completion = generate(batch, enc_G, max_new_tokens=args.max_new_tokens, temperature=T,
                              do_sample=True, synced_gpus=getattr(args, "fsdp", False))
    t_rollout = time.time() - t0  # completion: [B*G, C]

    # 3. Rewards r_i = R(q, o_i): the task's metric on the decoded text (untrusted: parsed by json).
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    parts = [task.reward(s, t, **args.reward_opts) for s, t in zip(samples_G, texts)]
    r = torch.tensor([p["total"] for p in parts], dtype=torch.float32, device=device)  # [B*G]

    # 4. Group-normalised advantages A_i; count the groups that carry no signal.
    A, constant = group_advantages(r, G, args.adv_scale)  # [B*G], [B]

    # 5. Micro-batches of whole sequences; global counts of tokens and sequences over all ranks.
    slices = [slice(k, k + args.micro_batch) for k in range(0, len(enc_G), args.micro_batch)]
    batches = [sequence_batch(model, tokenizer, prompts_G[sl], enc_G[sl], completion[sl])
               for sl in slices]
    n_tokens = all_reduce_sum(sum(m.sum() for _, m in batches).detach().clone()).item()
    n_seqs = len(enc_G) * world_size()
    fwd_batches = [(b, enc_G[sl]) for (b, _), sl in zip(batches, slices)]

    # 6. log pi_old and log pi_ref, no grad, at the sampling temperature (pi_old = the policy that
    #    sampled). With mu = 1 pi_old is the current policy, so logp_old = logp.detach() below.
    model.train()  # our configs have zero dropout, so train mode scores exactly like sampling did
    logp_old = logprobs_no_grad(policy, fwd_batches, T) if args.mu > 1 else None
    logp_ref = logprobs_no_grad(ref, fwd_batches, T) if args.beta > 0 else None

    # 7. mu optimiser updates of L on this rollout. The micro-batch losses sum to the global
    #    normalisation; DDP/FSDP average gradients over ranks, hence the * world_size.
    stats = {"kl": 0.0, "clip_frac": 0.0, "ratio": 0.0, "entropy": 0.0}
    total_loss, grad_norm, skipped = 0.0, 0.0, 0
    for it in range(args.mu):
        total_loss = 0.0
        for k, ((b, mask), (_, enc)) in enumerate(zip(batches, fwd_batches)):
            grad_sync(policy, k == len(batches) - 1)
            logp, entropy = policy(**b, encodings=enc, temperature=T, return_entropy=True)
            old = logp.detach() if logp_old is None else logp_old[k]  # logp: [n, L - 1]
            ref_lp = logp_ref[k] if logp_ref is not None else None
            loss, s = grpo_loss(logp, old, ref_lp, A[slices[k]], mask, args.eps_low, args.eps_high,
                                args.beta, args.agg, n_tokens, n_seqs, args.max_new_tokens)
            (loss * world_size()).backward()
            total_loss += loss.item()
            if it == 0:  # KL, entropy of the first pass: before any update, as the rollout saw it
                stats["kl"] += s["kl"]
                stats["entropy"] += (entropy * mask).sum().item()
            if it == args.mu - 1:  # rho and clip fraction of the last pass (see step_stats)
                stats["ratio"] += s["ratio"]
                stats["clip_frac"] += s["clip_frac"]
        grad_norm, skip = finish_step(policy, optimizer, total_loss, args.max_grad_norm)
        skipped += skip  # of the mu updates

    # 8. Logged statistics, averaged over all ranks (step_stats, below).
    out = step_stats(completion, tokenizer, r, parts, constant, stats, total_loss, G, n_tokens,
                     n_seqs)
    return {**out, "grad_norm": grad_norm, "skipped": skipped, "completion_tokens": n_tokens,
            "step_time": time.time() - t0, "rollout_time": t_rollout,
            "tokens_per_s": n_tokens / max(time.time() - t0, 1e-9),
            "_texts": texts}  # for the caller's sample log (not reduced: this rank's completions)


def step_stats(completion, tokenizer, rewards, parts, constant, stats, loss, G, n_tokens, n_seqs):
    """grpo_step's logged statistics: this rank's sums, all-reduced over ranks as one float64 vector
    (keys in sorted order), then normalised: reward_std and zero_std_frac per group; kl, clip_frac,
    ratio and entropy per completion token; the rest per completion. "loss" stays a sum: each rank
    holds its share of the global loss. kl and entropy are those of the first of the mu passes
    (before any update, as the rollout saw it); ratio and clip_frac those of the last, after mu - 1
    updates: how far the policy has moved from the one that sampled (pass 0 would always log 1 and
    0; at mu = 1 it is 1, 0)."""
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
    out = dict(zip(keys, all_reduce_sum(summed).tolist()))
    for k in keys:
        if k in ("reward_std", "zero_std_frac"):  # per group
            out[k] /= n_seqs / G
        elif k in ("kl", "clip_frac", "ratio", "entropy"):  # per completion token
            out[k] /= max(n_tokens, 1)
        elif k != "loss":  # per completion
            out[k] /= n_seqs
    return out
