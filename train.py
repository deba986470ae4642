r"""train.py: SFT and GRPO for 3D-RFT, one process or many (torchrun; DDP or FSDP2), CPU or GPU.

    python train.py --stage sft  --task detection    # tiny model, synthetic scenes, CPU, minutes
    python train.py --stage grpo --task detection    # runs the SFT warm-up first if none is found
    torchrun --nproc_per_node 8 train.py --stage grpo --task grounding --model VG-LLM-4B --bf16 \
        --data scanrefer_train_32frames.json --val-data scanrefer_val_32frames.json \
        --media-root data/media --shard fsdp ...

Layout of --out (default runs/<task>):
    init/                 the tiny random model + tokenizer the run started from (embedded default)
    <stage>/step-<k>/     model/ (safetensors, config, tokenizer), state.pt (optimiser, RNG, step)
    <stage>/final/, best/ the last model and the best one on the validation set
    <stage>/metrics.jsonl one strict-JSON line per step and per evaluation
    <stage>/samples.jsonl a few completions
    <stage>/data.json     files read: their SHA-256, rows, rows per type, skipped rows (data.py)
Every directory is written under a temp name and renamed, with checksums.json (sha256 of its files),
so a kill at any moment leaves the previous one intact. A fresh run refuses an --out/<stage> that
holds work; `--resume` (the same command plus --resume, SFT warm-up included) continues from the
newest intact checkpoint, sets damaged ones aside as damaged-step-<k>, and cuts the logs back to it.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import data
import grpo
import lora
import model as vgllm
import rft3d
import rollout_vllm
import compare
import safety
import scenes
from eval import PRIMARY_METRIC, evaluate

# --------------------------------------------------------------------------------------------------
# The knobs (one screen). Defaults give a meaningful run of the tiny model on a CPU.


def get_args(argv=None, stage=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("stage, task, start point").add_argument
    a("--stage", choices=["sft", "grpo"], default="grpo",
      help="SFT (cross-entropy) or GRPO (RL on the metric)")
    a("--task", choices=sorted(rft3d.TASKS), default="detection", help="which 3D task")
    a("--model", help="start: our save / VG-LLM dir (default: tiny random model or the SFT result)")
    a("--qwen", help="a Qwen2.5-VL checkpoint dir (with --vggt: the paper's base model)")
    a("--vggt", help="VGGT-1B model.safetensors / model.pt (geometry branch)")
    d = p.add_argument_group("data (default: synthetic scenes)").add_argument
    s = p.add_argument_group("synthetic scenes").add_argument
    d("--data", nargs="+", metavar="FILE[:W]", help="VG-LLM JSON / VSI-Bench file(s) of --task; "
      "several make a mix drawn per step in proportion to whole-number weights W (default 1): "
      "--data a.json:2 b.json:1")
    d("--val-data", nargs="+", metavar="FILE", help="validation file(s) for periodic eval, all rows"
      " of all files (weights ignored; default: synthetic; required with --data)")
    d("--media-root", help="root of the image/video paths in --data")
    s("--train-size", type=int, default=0, help="fixed training set size (0: fresh scenes forever)")
    s("--val-size", type=int, default=100, help="validation scenes for periodic eval")
    s("--test-size", type=int, default=400, help="GRPO: unseen test scenes of the final "
      "start-vs-GRPO table (0: skip)")
    s("--data-seed", type=int, default=0, help="training scenes (a new --seed: same set, new run)")
    d("--frames", type=int, default=4, help="frames sampled per video / scene")
    s("--image-size", type=int, default=56, help="frame size in pixels (the tiny default model is "
      "built to see it; a loaded model resizes frames to its own width and says so)")
    s("--pitch", type=float, default=0.0, help="camera pitch, deg (0: level, boxes need one angle)")
    s("--max-objects", type=int, default=1, help="objects per scene, at most (1: the learnable "
      "default; 3: multi-object scenes the tiny model does not bind in the default budget; README)")
    s("--spelling", choices=["canonical", "random"], default="canonical", help="target "
      "boxes/order spelled one way, or a random one of the equivalent spellings")
    a = p.add_argument_group("optimisation (batch defaults: per step, over all ranks)").add_argument
    a("--steps", type=int, help="optimiser steps (default: sft --sft-steps, grpo 200)")
    a("--sft-steps", type=int, default=1200, help="warm-up SFT steps when GRPO finds none (1200)")
    a("--batch-size", type=int, help="SFT samples per rank per step (default: 16 per step)")
    a("--prompts-per-rank", type=int, help="GRPO prompts per rank per step, x G completions "
      "(default: 4 per step)")
    a("--micro-batch", type=int, default=16, help="sequences per forward (more: grad accumulation)")
    a("--lr", type=float, help="LLM learning rate (default sft 1e-3, grpo 1e-4; real models ~5e-6)")
    a("--lr-merger", type=float, help="geometry-merger learning rate (default: 2 x --lr)")
    a("--warmup", type=int, default=20, help="linear warm-up steps")
    a("--schedule", choices=["cosine", "constant"],
      help="after warm-up (default: sft cosine, grpo constant)")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a = p.add_argument_group("sampling and GRPO").add_argument
    a("--G", type=int, default=8, help="completions per prompt")
    a("--temperature", type=float, default=1.0, help="sampling temperature (scored logits too)")
    a("--max-new-tokens", type=int, help="completion length cap (default: from the task)")
    a("--beta", type=float, default=0.04, help="k3 KL weight (0 = no reference model)")
    a("--eps-low", type=float, default=0.2, help="lower clip range of the ratio")
    a("--eps-high", type=float, default=0.2, help="upper clip range (> eps-low: DAPO clip-higher)")
    a("--mu", type=int, default=1, help="optimiser updates per rollout (1: ratio is exactly 1)")
    a("--adv-scale", choices=["group", "batch", "none"], default="group", help="advantages / std")
    a("--agg", choices=["token", "seq", "drgrpo"], default="token", help="loss aggregation")
    a("--iou-mode", choices=["paper", "robust", "gt"], default="paper", help="detection IoU reward "
      "term: paper (mean over predicted boxes; at one object per scene it equals gt on every "
      "one-box answer, so dropping boxes cannot pay), robust, or gt (a missed box costs; use it "
      "with --max-objects > 1); rewards.detection_reward")
    a("--f1-iou", type=float, default=0.25, help="detection reward's F1 term: IoU threshold "
      "(0.25: the paper's; 0.5: reward the stricter F1@0.5)")
    a("--frame-window", choices=["scaled", "fixed"], default="scaled", help="grounding frame "
      "reward window: tau = 5 S / 32 for S frames (32 frames: the paper's 5; 4 frames: only the "
      "exact frame pays), or fixed: the paper's 5 whatever S (to reproduce published numbers)")
    a = p.add_argument_group("model, hardware, run").add_argument
    a("--no-geometry", action="store_true", help="tiny model without the VGGT branch (ablation)")
    a("--lora-rank", type=int, default=0, help="LoRA on the LLM linears (0 = full fine-tuning)")
    a("--bf16", action="store_true", help="bf16 autocast (GPU)")
    a("--grad-ckpt", action="store_true", help="gradient checkpointing of the LLM layers")
    a("--shard", choices=["ddp", "fsdp"], default="ddp", help="DDP or FSDP2 under torchrun")
    a("--rollout", choices=["own", "vllm"], default="own", help="GRPO's sampler: our decode loop, "
      "or a vLLM engine per rank (rollout_vllm.py; vLLM in its own venv, README)")
    a("--workers", type=int, default=0, help="data-loader worker processes (frame decoding)")
    a("--seed", type=int, default=0, help="seed (each rank samples with seed + rank)")
    a("--eval-every", type=int, help="steps between evaluations (default: steps // 5)")
    a("--save-every", type=int, help="steps between checkpoints (default: steps // 5)")
    a("--keep", type=int, default=2, help="checkpoints to keep")
    a("--log-every", type=int, default=10, help="steps between sample logs")
    a("--resume", action="store_true", help="resume from --out/<stage>'s newest intact checkpoint")
    a("--skip-bad", action="store_true",
      help="skip (count and report) bad rows of --data/--val-data instead of stopping")
    a("--max-bad-steps", type=int, default=5,
      help="stop after this many skipped steps (non-finite loss or gradient norm) in a row")
    a("--out", help="output dir (default runs/<task>)")
    return finish_args(p, p.parse_args(argv), stage)


def finish_args(p, args, stage=None):
    """The parsed flags completed: --data's FILE[:W] lists, the defaults that depend on the stage,
    the checks. stage="sft": GRPO's warm-up, the same command line with SFT's own steps and
    schedule, and full fine-tuning (a random LLM warmed up through LoRA adapters only barely learns
    the answer format). `is None`, never `or`: an explicit 0 is the user's value (check_args
    refuses it where it makes no sense), not a request for the default."""
    try:  # --data a.json:2 b.json -> [("a.json", 2), ("b.json", 1)]
        args.data, args.val_data = (data.parse_files(x) if x else None
                                    for x in (args.data, args.val_data))
    except ValueError as e:
        p.error(str(e))
    if stage == "sft":
        args.stage, args.steps, args.lora_rank = "sft", args.sft_steps, 0
        args.lr = args.lr_merger = args.schedule = args.eval_every = args.save_every = None
    given = lambda value, default: default if value is None else value
    sft = args.stage == "sft"
    args.steps = given(args.steps, args.sft_steps if sft else 200)
    args.lr = given(args.lr, 1e-3 if sft else 1e-4)
    # Batch defaults are per step, whatever the number of ranks (torchrun sets WORLD_SIZE before we
    # parse): `--nproc_per_node 2` on 2 cores is the same recipe twice as fast, not twice the batch.
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    args.batch_size = given(args.batch_size, max(16 // ranks, 1))
    args.prompts_per_rank = given(args.prompts_per_rank, max(4 // ranks, 1))
    args.lr_merger = given(args.lr_merger, 2 * args.lr)
    args.schedule = given(args.schedule, "cosine" if sft else "constant")
    args.max_new_tokens = given(args.max_new_tokens, rft3d.MAX_NEW_TOKENS[args.task])
    args.eval_every = given(args.eval_every, max(args.steps // 5, 1))
    args.save_every = given(args.save_every, max(args.steps // 5, 1))
    args.out = given(args.out, f"runs/{args.task}")
    safety.check_args(args, p)
    args.reward_opts = {"detection": {"iou_mode": args.iou_mode, "f1_iou": args.f1_iou},
                        "grounding": {"frame_window": args.frame_window}, "spatial": {}}[args.task]
    args.fsdp = args.shard == "fsdp" and "RANK" in os.environ  # one process: nothing to shard
    return args


# --------------------------------------------------------------------------------------------------
# Learning rate, data, models (the data order is data.StepSampler)


def lr_factor(step, args):
    """Linear warm-up to 1 over --warmup steps, then constant or a cosine to 0 over the remaining
    steps (the cosine starts where the warm-up ends: it does not decay during the warm-up)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def world(args):
    """The synthetic world's knobs (scenes.SyntheticDataset keyword arguments) from the flags."""
    return dict(frames=args.frames, size=args.image_size, pitch=args.pitch,
                max_objects=args.max_objects, spelling=args.spelling)


def datasets(args):
    """(train, val, info): datasets of data.Sample and what was read. Synthetic by default (train
    and val seeds never meet). Files are checked when opened (data.py); several --data files are
    concatenated and info["mix"] = [(rows, weight)] per file tells StepSampler their proportions;
    --val-data files are evaluated end to end. info["train"], info["val"]: per file its path,
    SHA-256, row counts, skipped rows."""
    skip_bad = getattr(args, "skip_bad", False)  # the --skip-bad flag, where the command has one
    mix = None
    if args.data:
        train, train_info = data.load_files(args.task, [path for path, _ in args.data],
                                            args.media_root, args.frames, skip_bad)
        if len(args.data) > 1:
            mix = [(r["kept"], w) for r, (_, w) in zip(train_info, args.data)]
    else:
        n = args.train_size or 10**9  # 'fresh scenes forever': item i made from (seed, i) on demand
        train = scenes.SyntheticDataset(args.task, n, seed=1000 + args.data_seed, **world(args))
        train_info = [{"source": "synthetic", "task": args.task, "seed": 1000 + args.data_seed,
                       "n": args.train_size or "fresh scenes", **world(args)}]
    if args.val_data:
        val, val_info = data.load_files(args.task, [path for path, _ in args.val_data],
                                        args.media_root, args.frames, skip_bad)
    else:
        val = scenes.SyntheticDataset(args.task, args.val_size, seed=1, **world(args))
        val_info = [{"source": "synthetic", "task": args.task, "seed": 1, "n": args.val_size,
                     **world(args)}]
    return train, val, {"train": train_info, "val": val_info, "mix": mix}


# --------------------------------------------------------------------------------------------------
# Models: build / load, wrap for DDP or FSDP2 (saving them atomically is safety.py's job)


def tiny_init(args, rank):
    """The embedded default: a tokenizer trained offline on our tasks' text and a random tiny model,
    built once by rank 0 and saved atomically: every rank (and later run) loads the same bytes."""
    init = Path(args.out) / "init"
    safety.recover(init)
    if rank == 0 and not init.is_dir():
        corpus = []
        for name, task in rft3d.TASKS.items():
            ds = scenes.SyntheticDataset(name, 200, seed=7, **world(args))
            corpus += [task.prompt(s, think=True) + task.target(s) for s in ds]
        tok = vgllm.build_tiny_tokenizer(corpus)
        torch.manual_seed(args.seed)
        net = vgllm.VGLLM(vgllm.tiny_config(len(tok), vggt=not args.no_geometry,
                                            image_size=args.image_size))
        with safety.atomic_dir(init) as tmp:
            checkpoints.save_pretrained(net, tok, tmp)
            (tmp / "init.json").write_text(json.dumps({"seed": args.seed}))  # safety.check_out
            checkpoints.seal(tmp)  # listed in checksums.json too
        n = sum(p.numel() for p in net.parameters())
        print(f"built the tiny default model ({n:,} parameters) -> {init}")
    if dist.is_initialized():
        dist.barrier()
    return str(init)


def load_model(args, rank, path=None):
    """-> (model, tokenizer) on CPU in fp32; frozen parts (vision tower, VGGT) have requires_grad
    False. Seeded: a freshly initialised merger (Qwen + VGGT start) is the same in policy, reference
    and ranks. fp32 master weights even for bf16 checkpoints (AdamW updates of ~1e-6 vanish in
    bf16): --bf16 computes in bf16 (autocast under DDP, FSDP2's MixedPrecisionPolicy) and keeps
    these fp32 copies for the optimiser."""
    torch.manual_seed(args.seed)
    if path is None and args.qwen:
        return checkpoints.from_qwen_and_vggt(args.qwen, args.vggt, dtype=torch.float32)
    path = path or tiny_init(args, rank)
    if "use_vggt_feature" in checkpoints.read_json(Path(path) / "config.json"):
        return checkpoints.from_vgllm(path, dtype=torch.float32)
    return checkpoints.load_pretrained(path, dtype=torch.float32)


def wrap(net, args, device, trainable=True):
    """DDP replicates the model and all-reduces gradients; FSDP2 shards parameters, gradients and
    optimiser state per decoder layer. Frozen modules have requires_grad False: DDP skips them, so
    there are no 'unused parameter' errors. A frozen reference model is never wrapped by DDP."""
    net.to(device)
    if not dist.is_initialized():
        return net
    if args.fsdp:
        bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else {}
        for layer in net.qwen.model.language_model.layers:
            fully_shard(layer, mp_policy=MixedPrecisionPolicy(**bf16))
        # The root does not cast its inputs: FSDP's cast rebuilds every dataclass, so the Encoding
        # objects the G rows of a group share would become G distinct ones, and encode-once and the
        # shared prefill (keyed on object identity) would silently do G times the work. VGLLM casts
        # the encodings itself (image_embeds).
        fully_shard(net, mp_policy=MixedPrecisionPolicy(**bf16, cast_forward_inputs=False))
        for method in ("encode", "generate"):  # called outside forward: gather the root's shards
            register_fsdp_forward_method(net, method)
        return net
    if not trainable:
        return net
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


# --------------------------------------------------------------------------------------------------
# One stage: the training loop, then its pieces in the order it calls them


def train(args):
    """One stage (--stage) from its start point, or its newest checkpoint, to <stage>/final."""
    rank, world, device = grpo.setup_distributed()
    stage_dir = Path(args.out) / args.stage
    task = rft3d.TASKS[args.task]
    train_set, val_set, data_info = datasets(args)  # first: a bad data file stops before any model

    # 1. The models: the start point, or with --resume the newest intact checkpoint (state.pt).
    policy, ref, tokenizer, state = start_models(args, rank, device, stage_dir)
    model = grpo.unwrap(policy)

    # 2. Optimiser: AdamW, separate learning rates for the LLM and the geometry merger.
    optimizer, params = build_optimizer(policy, args)
    step, best = 0, {"value": -float("inf")}
    if state is not None:  # 3. Exact resume: optimiser moments, step, data position, RNG streams
        safety.resume_optimizer(model, optimizer, state, args, rank)
        step, best = state["step"], state["extra"]["best"]

    # 4. Data: each rank reads its own slice of every global batch.
    per_rank = args.batch_size if args.stage == "sft" else args.prompts_per_rank
    sampler = data.StepSampler(len(train_set), per_rank, rank, world, args.seed, step,
                               shuffle=len(train_set) < 10**7, mix=data_info["mix"])
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler,
                                              collate_fn=data.collate, num_workers=args.workers))
    # Seed (or restore) the sampling stream only now: creating the loader iterator draws from it.
    if state is not None:
        safety.restore_rng(state["rng"][rank])
    else:
        torch.manual_seed(args.seed + rank)  # per-rank sampling streams
    if rank == 0:
        announce(args, world, device, model, sum(p.numel() for p in params), per_rank, data_info)
    log, samples_log = safety.open_logs(stage_dir, data_info, step) if rank == 0 else (None, None)

    # 5. The loop.
    bad_in_a_row, t_loop, first = 0, time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.stage} {args.task}", disable=rank != 0)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16 and not args.fsdp)
    while step < args.steps:
        samples = next(loader)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, args)
        t_step = time.time()
        with autocast:
            if args.stage == "sft":
                out = grpo.sft_step(policy, tokenizer, task, samples, optimizer, args.micro_batch,
                                    args.max_grad_norm)
            else:
                out = grpo.grpo_step(policy, ref, tokenizer, task, samples, optimizer, args)
        out.setdefault("step_time", time.time() - t_step)  # GRPO times its phases; SFT: the step
        step += 1
        bad_in_a_row = safety.count_skipped(bad_in_a_row, out["skipped"], step, args.max_bad_steps)
        texts = out.pop("_texts", None)
        if rank == 0:
            out.update(step=step, lr=optimizer.param_groups[0]["lr"])
            log_step(args, out, texts, log, samples_log, bar, (first, t_loop, len(val_set)))
        if step % args.eval_every == 0 or step == args.steps:
            value = validate(model, tokenizer, val_set, args, autocast, step, log, rank)
            if value > best["value"]:
                best = {"value": value, "step": step}
                safety.save_model(policy, tokenizer, stage_dir / "best", rank)
        if step % args.save_every == 0 or step == args.steps:
            safety.save_checkpoint(policy, tokenizer, optimizer, step, stage_dir, args, rank,
                                   {"best": best})
    bar.close()
    safety.save_model(policy, tokenizer, stage_dir / "final", rank)
    if rank == 0:
        print(f"[{args.stage}] done: {stage_dir / 'final'} (best {PRIMARY_METRIC[args.task]} "
              f"{best['value']:.4f} at step {best.get('step')})")
    return stage_dir / "final"


def start_models(args, rank, device, stage_dir):
    """-> (policy, ref, tokenizer, state). The start: --model, else the SFT result for GRPO (main()
    runs the warm-up if it is missing), else (None) the Qwen + VGGT pair or the tiny default; with
    --resume the newest intact checkpoint instead (state: its state.pt, else None). ref: GRPO's
    frozen reference (--beta > 0): the start point, never updated."""
    start = start_point(args)
    load = lambda path: load_model(args, rank, path)
    ckpt, net, tokenizer, state = (safety.resume_point(args, rank, stage_dir, load) if args.resume
                                   else (None,) * 4)
    if ckpt is None:
        net, tokenizer = load_model(args, rank, start)
    if args.lora_rank:  # saves merge adapters: --resume restarts them from merged weights, inexact
        lora.apply_lora(net, rank=args.lora_rank, alpha=2 * args.lora_rank)
    if args.grad_ckpt:
        net.enable_gradient_checkpointing()
    ref = None
    if args.stage == "grpo" and args.beta > 0:
        ref, _ = load_model(args, rank, start)
        ref.requires_grad_(False).eval()
        ref = wrap(ref, args, device, trainable=False)
    return wrap(net, args, device), ref, tokenizer, state


def build_optimizer(policy, args):
    """-> (AdamW, its parameters): the LLM at --lr, the geometry merger at --lr-merger (VG-LLM:
    5e-6 / 1e-5); lr_factor scales each group's base_lr at every step."""
    model = grpo.unwrap(policy)
    merger = {id(p) for p in model.merger.parameters()} if model.merger is not None else set()
    params = [p for p in policy.parameters() if p.requires_grad]
    llm = [p for p in params if id(p) not in merger]
    geometry = [p for p in params if id(p) in merger]
    groups = [{"params": llm, "lr": args.lr, "base_lr": args.lr},
              {"params": geometry, "lr": args.lr_merger, "base_lr": args.lr_merger}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0), params


def announce(args, world, device, model, n_train, per_rank, data_info):
    """Rank 0, before the first step: where the stage runs, its batch, every flag, the data."""
    print(f"[{args.stage}/{args.task}] {world} rank(s) on {device}, {args.shard}; "
          f"trainable {n_train:,} params")
    if args.shard == "fsdp" and not args.fsdp:
        print("  --shard fsdp outside torchrun: one process, nothing to shard; the model runs "
              "unwrapped" + (" with bf16 autocast (--bf16)" if args.bf16 else ""))
    if not args.data and model.config["image_width"] != args.image_size:
        print(f"  --image-size {args.image_size}: this model resizes every frame to "
              f"{model.config['image_width']} px wide (its config's image_width)")
    G, mb = args.G, args.micro_batch
    if args.stage == "sft":
        print(f"  batch: {per_rank} samples/rank x {world} ranks = {per_rank * world} per step, "
              f"micro-batch {mb}")
    else:
        print(f"  batch: {per_rank} prompts/rank x G={G} = {per_rank * G} completions/rank, "
              f"{per_rank * G * world} per step, micro-batch {mb} ({math.ceil(per_rank * G / mb)} "
              f"micro-steps), mu={args.mu}, beta={args.beta}")
    print("  " + json.dumps({k: v for k, v in vars(args).items() if k != "reward_opts"}))
    for split in ("train", "val"):
        for r in data_info[split]:
            print(f"  {split} " + data.describe(r).replace("\n", "\n  "))


def log_step(args, out, texts, log, samples_log, bar, pace):
    """Rank 0, after each step: the metrics line, the progress bar, 5 steps in the time the stage
    will take, every --log-every steps a few completions. pace = (first step, its time, val size)"""
    step, (first, t_loop, n_val) = out["step"], pace
    log.write(safety.json_line(out))
    log.flush()
    bar.update(1)
    bar.set_postfix({k: f"{out[k]:.3f}" for k in ("loss", "reward") if k in out})
    if step == first + 5:  # said early (tqdm's estimate then keeps it current)
        left, minutes = args.steps - first, (time.time() - t_loop) / 5 * (args.steps - first) / 60
        tqdm.write(f"[{args.stage}] {left} steps: about {minutes:.0f} min at the first steps' "
                   f"pace, plus {math.ceil(left / args.eval_every)} evaluations on {n_val} scenes")
    if texts and step % args.log_every == 0:
        samples_log.write(safety.json_line({"step": step, "completions": texts[: args.G]}))
        samples_log.flush()


def validate(model, tokenizer, val_set, args, autocast, step, log, rank):
    """Evaluate on the validation set and log it (rank 0) -> the primary metric (picks best/)."""
    with autocast:  # the dtype training computes in (DDP: autocast; FSDP: its bf16 parameters)
        metrics = evaluate(model, tokenizer, args.task, val_set, max_new_tokens=args.max_new_tokens,
                           synced_gpus=args.fsdp)["metrics"]
    if rank == 0:
        log.write(safety.json_line({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}))
        log.flush()
        shown = [PRIMARY_METRIC[args.task], "parse_rate", "iou_gt", "n_pred", "count_acc", "iou",
                 "frame_acc"]
        tqdm.write(f"step {step}: eval "
                   + ", ".join(f"{k} {metrics[k]:.3f}" for k in shown if k in metrics))
    return metrics[PRIMARY_METRIC[args.task]]


# --------------------------------------------------------------------------------------------------
# The main command: the SFT warm-up if needed, the stage, the closing start-vs-GRPO table


def report(args, start, rank, device):
    """The main command's last part (synthetic data): the SFT start and the GRPO result, each the
    best on validation, on the same --test-size unseen test scenes (seed 2), side by side with
    paired per-scene differences and their standard errors (DESIGN.md section 9), three ways:
    greedy, sampled at --temperature (G samples per scene: their mean and their best); and
    grpo/curves.png. A single run is one seed: bench.py learning makes the claim with seeds."""
    test = scenes.SyntheticDataset(args.task, args.test_size, seed=2, **world(args))
    grpo_dir = Path(args.out) / "grpo"
    per = {"greedy": {}, "sampled": {}, f"best of {args.G}": {}}
    for name, path in (("SFT start", start), ("GRPO", grpo_dir / "best")):
        if path is not None:
            safety.recover(Path(path))
        net, tok = load_model(args, rank, path)  # path None: the --qwen/--vggt pair, as trained
        run = lambda **kw: evaluate(net.to(device), tok, args.task, test, progress=True,
                                    max_new_tokens=args.max_new_tokens, **kw)["records"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):  # as training
            per["greedy"][name] = compare.per_scene(args.task, run())
            torch.manual_seed(args.seed + 2 + rank)  # the same sampling stream for both models
            mean, best = compare.sampled(args.task, run(samples=args.G,
                                                        temperature=args.temperature), args.G)
        per["sampled"][name], per[f"best of {args.G}"][name] = mean, best
    if rank == 0:
        start_name = start or f"{args.qwen} + {args.vggt}"
        out = compare.closing_report(args.task, per, start_name, grpo_dir,
                                     PRIMARY_METRIC[args.task], args.val_size)
        out["float_path"] = float_path(device)
        (grpo_dir / "report.json").write_text(safety.json_line(out, indent=1))
        # the per-scene values behind the tables, so verdicts across runs can be recomputed
        (grpo_dir / "per_scene.json").write_text(safety.json_line(
            {way: {arm: {k: v.tolist() for k, v in m.items()} for arm, m in arms.items()}
             for way, arms in per.items()}))
        print(f"wrote {grpo_dir / 'curves.png'}, report.json and per_scene.json")


def float_path(device):
    """What a run's numbers depend on besides its seed: results are bit-exact on one machine, but
    float rounding differs across CPU kernels, GPUs, thread and process counts (README)."""
    on = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"cpu, ATen capability {torch.backends.cpu.get_cpu_capability()}")
    return {"torch": torch.__version__, "device": on, "threads": torch.get_num_threads(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def start_point(args):
    """What a stage starts from: --model; else, for GRPO, the SFT warm-up's best model on
    validation (the paper's RL start: the SFT model, early-stopped); else None (the Qwen + VGGT
    pair or the tiny default)."""
    if args.model or args.qwen or args.stage != "grpo":
        return args.model
    safety.recover(Path(args.out) / "sft" / "best")
    return str(Path(args.out) / "sft" / "best")


def main(argv=None):
    args = get_args(argv)
    safety.set_threads()
    sft_final = Path(args.out) / "sft" / "final"
    safety.recover(sft_final)
    warmup = (args.stage == "grpo" and not (args.model or args.qwen)
              and not (sft_final / "config.json").exists())
    sft_args = get_args(argv, stage="sft") if warmup else None
    safety.check_out(args, warmup)
    try:
        if warmup:  # The paper: RL from an un-warmed model gets no reward signal (no parseable
            # answers), so GRPO on the embedded default starts from an SFT warm-up, run here first
            # with SFT defaults (with --resume it continues from its own newest checkpoint).
            if os.environ.get("RANK", "0") == "0":
                print(f"no SFT checkpoint at {sft_final}: running the SFT warm-up first (python "
                      f"train.py --stage sft). Three parts: SFT warm-up ({sft_args.steps} steps), "
                      f"GRPO ({args.steps} steps), then the start-vs-GRPO table on "
                      f"{args.test_size} test scenes; each says how long it takes when it starts")
            train(sft_args)
        train(args)
        if args.stage == "grpo" and not args.data and args.test_size:  # the main command's result
            rank, _, device = grpo.setup_distributed()
            report(args, start_point(args), rank, device)
    except (checkpoints.CheckpointError, data.DataError) as e:  # one line naming the file (and row)
        safety.fail_on(e, Path(args.out) / "init")
    rollout_vllm.close()  # --rollout vllm: its engines first, they hold groups of this process
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
