"""Real-size GPU measurements with random weights (bf16): SFT step MFU, GRPO step phases at G = 8, peak memory,
and the same step under FSDP2 (fully_shard) on one GPU.

    python bench_gpu.py --model qwen2.5-vl-3b --frames 32 [--fsdp]

Inputs are built by hand (no tokenizer is needed for timing): a prompt of text ids, one vision block of
<|image_pad|> tokens per frame, and random completions; frames are 518 x 392 (ScanNet's aspect: 252 Qwen
tokens per frame).
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import grpo
import model as M

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


def build(name, device):
    cfg = M.real_config(name)
    with torch.device(device):
        net = M.VGLLM(cfg)
    net.to(torch.bfloat16)
    return net, cfg


def prompt(cfg, enc_list, text_len=64, seed=0):
    """Left-padded-free batch: [text] + per frame [vision_start, image_pad * T, vision_end] + [text]."""
    q, g = cfg["qwen"], torch.Generator().manual_seed(seed)
    rows = []
    for enc in enc_list:
        ids, types = torch.randint(0, 150000, (text_len // 2,), generator=g).tolist(), [0] * (text_len // 2)
        for T in enc.n_tokens_per_image:
            ids += [q["vision_start_token_id"]] + [q["image_token_id"]] * T + [q["vision_end_token_id"]]
            types += [0] + [1] * T + [0]
        tail = torch.randint(0, 150000, (text_len // 2,), generator=g).tolist()
        rows.append((ids + tail, types + [0] * len(tail)))
    ids = torch.tensor([r[0] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.tensor([r[1] for r in rows]),
            "image_grid_thw": torch.cat([e.image_grid_thw.cpu() for e in enc_list])}


def timed(fn, device):
    torch.cuda.synchronize(device)
    t = time.time()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.time() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-vl-3b")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    gpu = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), 989e12)
    torch.manual_seed(0)
    t0 = time.time()
    net, cfg = build(args.model, device)
    net.enable_gradient_checkpointing()
    res = {"model": args.model, "frames": args.frames, "G": args.G, "gpu": gpu, "fsdp": args.fsdp,
           "build_s": round(time.time() - t0, 1)}
    n_llm = sum(p.numel() for p in net.qwen.model.language_model.parameters())
    if args.fsdp:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
        for layer in net.qwen.model.language_model.layers:
            fully_shard(layer)
        fully_shard(net)
        for m in ("encode", "generate"):
            register_fsdp_forward_method(net, m)
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-6)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (args.frames, 392, 518, 3), dtype=np.uint8)]

    # encode once (vision tower + VGGT)
    enc, res["encode_s"] = timed(lambda: net.encode(frames), device)
    batch = prompt(cfg, enc)
    P = batch["input_ids"].shape[1]
    res["prompt_tokens"] = P

    # SFT step: one sample, a 128-token answer
    comp = torch.randint(0, 150000, (1, args.new_tokens), device=device)
    seq = {k: v.to(device) for k, v in batch.items()}
    seq["input_ids"] = torch.cat([seq["input_ids"], comp], 1)
    seq["attention_mask"] = torch.ones_like(seq["input_ids"])
    seq["mm_token_type_ids"] = torch.cat([seq["mm_token_type_ids"], torch.zeros_like(comp)], 1)

    def sft():
        lp = net(**seq, encodings=enc, first_position=P - 1)
        (-lp.sum() / args.new_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.train()
    timed(sft, device)  # warm-up
    torch.cuda.reset_peak_memory_stats(device)
    _, res["sft_step_s"] = timed(sft, device)
    res["sft_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    L = seq["input_ids"].shape[1]
    # 6 N T for the LLM forward+backward (+2 N T recompute under gradient checkpointing is not counted: MFU, not HFU)
    res["sft_tokens"] = L
    res["sft_mfu_llm"] = round(6 * n_llm * L / res["sft_step_s"] / peak, 3)

    # GRPO step at G: rollout from ONE encoding, reference log-probs, policy forward/backward, optimizer
    torch.cuda.reset_peak_memory_stats(device)
    enc_G = enc * args.G
    bG = {k: (v.repeat(args.G, 1) if k != "image_grid_thw" else torch.cat([v] * args.G)) for k, v in batch.items()}
    net.eval()
    gen, res["rollout_s"] = timed(lambda: net.generate(bG, enc_G, max_new_tokens=args.new_tokens, temperature=1.0,
                                                       synced_gpus=args.fsdp), device)
    res["rollout_tokens"] = int((gen != cfg["pad_token_id"]).sum())
    seqG = {k: v.to(device) for k, v in bG.items()}
    seqG["input_ids"] = torch.cat([seqG["input_ids"], gen], 1)
    seqG["attention_mask"] = torch.cat([seqG["attention_mask"], torch.ones_like(gen)], 1)
    seqG["mm_token_type_ids"] = torch.cat([seqG["mm_token_type_ids"], torch.zeros_like(gen)], 1)
    mb = args.micro_batch
    slices = [slice(i, i + mb) for i in range(0, args.G, mb)]

    def sub(sl):
        return {**{k: v[sl] for k, v in seqG.items() if k != "image_grid_thw"},
                "image_grid_thw": torch.cat([e.image_grid_thw for e in enc_G[sl]])}
    net.train()

    def ref():
        with torch.no_grad():
            return [net(**sub(sl), encodings=enc_G[sl], first_position=P - 1) for sl in slices]
    old, res["ref_logp_s"] = timed(ref, device)
    adv = torch.randn(args.G, device=device)

    def policy():
        for k, sl in enumerate(slices):
            lp = net(**sub(sl), encodings=enc_G[sl], first_position=P - 1)
            mask = torch.zeros_like(lp)
            mask[:, P - 1:] = 1
            loss, _ = grpo.grpo_loss(lp, lp.detach(), old[k], adv[sl], mask, 0.2, 0.2, 0.04, "token",
                                     mask.sum().item() * len(slices), args.G, args.new_tokens)
            loss.backward()
    _, res["policy_fwd_bwd_s"] = timed(policy, device)
    _, res["optimizer_s"] = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)), device)
    res["grpo_step_s"] = round(res["encode_s"] + res["rollout_s"] + res["ref_logp_s"] + res["policy_fwd_bwd_s"]
                               + res["optimizer_s"], 2)
    res["grpo_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    res["policy_mfu_llm"] = round(6 * n_llm * seqG["input_ids"].numel() / res["policy_fwd_bwd_s"] / peak, 3)
    res = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
