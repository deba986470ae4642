"""train.py: SFT and GRPO for 3D-RFT, one process or many (torchrun; DDP or FSDP2), CPU or GPU.

    python train.py --stage sft  --task detection            # tiny model, synthetic scenes, CPU, minutes
    python train.py --stage grpo --task detection            # runs the SFT warm-up first if none is found
    torchrun --nproc_per_node 8 train.py --stage grpo --task grounding --model VG-LLM-4B \
        --data scanrefer_train_32frames.json --media-root data/media --bf16 --shard fsdp ...

Layout of --out (default runs/<task>):
    init/                  the tiny random model + tokenizer this run started from (embedded default only)
    <stage>/step-<k>/      model/ (safetensors + config + tokenizer) and state.pt (optimiser, RNG, step)
    <stage>/final/, best/  the last model and the best one on the validation set
    <stage>/metrics.jsonl  one strict-JSON line per step and per evaluation; samples.jsonl: a few completions
    <stage>/data.json      what the run read: per file its SHA-256, rows, rows per type, skipped rows (data.py)
Every directory is written under a temp name and renamed, with checksums.json (sha256 of its files), so a kill at
any moment leaves the previous one intact. A fresh run refuses an --out/<stage> that holds work; `--resume`
(the same command plus --resume, SFT warm-up included) continues from the newest intact checkpoint, sets damaged
ones aside as damaged-step-<k>, and cuts the logs back to that step.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import grpo
import lora
import model as vgllm
import rft3d
import compare
import safety
import scenes
from eval import PRIMARY_METRIC, evaluate

# --------------------------------------------------------------------------------------------------
# The knobs (one screen). Defaults give a meaningful run of the tiny model on a CPU.


def get_args(argv=None, stage=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", choices=["sft", "grpo"], default="grpo", help="SFT (cross-entropy) or GRPO (RL on the metric)")
    a("--task", choices=sorted(rft3d.TASKS), default="detection", help="which 3D task")
    a("--model", default=None, help="start from: our save / VG-LLM dir (default: tiny random model, or the SFT result)")
    a("--qwen", default=None, help="a Qwen2.5-VL checkpoint dir (with --vggt: the paper's base model)")
    a("--vggt", default=None, help="VGGT-1B model.safetensors / model.pt (geometry branch)")
    a("--data", nargs="+", default=None, metavar="FILE[:W]", help="VG-LLM JSON / VSI-Bench file(s) of --task "
      "(default: synthetic scenes); several make a mix drawn per step in proportion to whole-number weights W "
      "(default 1): --data a.json:2 b.json:1")
    a("--val-data", nargs="+", default=None, metavar="FILE", help="validation file(s) for periodic eval, all rows "
      "of all files (weights ignored; default: synthetic; required with --data)")
    a("--media-root", default=None, help="root of the image/video paths in --data")
    a("--train-size", type=int, default=0, help="synthetic: fixed training set size (0 = fresh scenes forever)")
    a("--val-size", type=int, default=100, help="synthetic validation scenes for periodic eval")
    a("--test-size", type=int, default=400, help="GRPO on synthetic scenes: unseen test scenes of the final "
                                                  "start-vs-GRPO table (0: skip)")
    a("--data-seed", type=int, default=0, help="synthetic training scenes (fixed apart from --seed: same set, new run)")
    a("--frames", type=int, default=4, help="frames sampled per video / scene")
    a("--image-size", type=int, default=56, help="synthetic frame size in pixels (the tiny default model is built "
      "to see it; a loaded model resizes frames to its own width and says so)")
    a("--pitch", type=float, default=0.0, help="synthetic: camera pitch in degrees (0: level, boxes need one angle)")
    a("--max-objects", type=int, default=1, help="synthetic: objects per scene, at most (1: the learnable default; "
      "3: multi-object scenes, which the tiny model does not bind within the default budget, README)")
    a("--spelling", choices=["canonical", "random"], default="canonical",
      help="synthetic: target boxes/order spelled one way, or a random one of the equivalent spellings")
    a("--steps", type=int, default=None, help="optimiser steps (default: sft --sft-steps, grpo 200)")
    a("--sft-steps", type=int, default=1200, help="steps of the SFT warm-up that GRPO runs when it finds none (1200)")
    a("--batch-size", type=int, default=None, help="SFT samples per rank per step (default: 16 per step over all ranks)")
    a("--prompts-per-rank", type=int, default=None, help="GRPO prompts per rank per step, x G completions (default: 4 "
      "per step over all ranks)")
    a("--micro-batch", type=int, default=16, help="sequences per forward (gradient accumulation below that)")
    a("--lr", type=float, default=None, help="LLM learning rate (default: sft 1e-3, grpo 1e-4; real models ~5e-6)")
    a("--lr-merger", type=float, default=None, help="geometry-merger learning rate (default: 2 x --lr)")
    a("--warmup", type=int, default=20, help="linear warm-up steps")
    a("--schedule", choices=["cosine", "constant"], default=None, help="after warm-up (default: sft cosine, grpo constant)")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a("--G", type=int, default=8, help="GRPO: completions per prompt")
    a("--temperature", type=float, default=1.0, help="GRPO: sampling temperature (also divides the scored logits)")
    a("--max-new-tokens", type=int, default=None, help="completion length cap (default: from the task)")
    a("--beta", type=float, default=0.04, help="GRPO: k3 KL weight (0 = no reference model)")
    a("--eps-low", type=float, default=0.2, help="GRPO: lower clip range of the ratio")
    a("--eps-high", type=float, default=0.2, help="GRPO: upper clip range (DAPO's clip-higher if > eps-low)")
    a("--mu", type=int, default=1, help="GRPO: optimiser updates per rollout (1: ratio is exactly 1)")
    a("--adv-scale", choices=["group", "batch", "none"], default="group", help="advantage std scaling")
    a("--agg", choices=["token", "seq", "drgrpo"], default="token", help="loss aggregation")
    a("--iou-mode", choices=["paper", "robust", "gt"], default="paper", help="detection IoU reward term: paper (the default: "
      "mean over predicted boxes; at one object per scene it equals gt on every one-box answer, so dropping boxes "
      "cannot pay), robust, or gt (a missed box costs; use it with --max-objects > 1); rewards.detection_reward")
    a("--frame-window", choices=["scaled", "fixed"], default="scaled", help="grounding frame reward window: tau = "
      "5 S / 32 for S frames (32 frames: the paper's 5; 4 frames: only the exact frame pays), or fixed, the paper's "
      "5 whatever S (to reproduce published numbers)")
    a("--no-geometry", action="store_true", help="tiny model without the VGGT branch (ablation)")
    a("--lora-rank", type=int, default=0, help="LoRA on the LLM linears (0 = full fine-tuning)")
    a("--bf16", action="store_true", help="bf16 autocast (GPU)")
    a("--grad-ckpt", action="store_true", help="gradient checkpointing of the LLM layers")
    a("--shard", choices=["ddp", "fsdp"], default="ddp", help="data parallel or FSDP2 under torchrun")
    a("--workers", type=int, default=0, help="data-loader worker processes (frame decoding)")
    a("--seed", type=int, default=0, help="seed (each rank samples with seed + rank)")
    a("--eval-every", type=int, default=None, help="steps between evaluations (default: steps // 5)")
    a("--save-every", type=int, default=None, help="steps between checkpoints (default: steps // 5)")
    a("--keep", type=int, default=2, help="checkpoints to keep")
    a("--log-every", type=int, default=10, help="steps between sample logs")
    a("--resume", action="store_true", help="continue from the newest intact checkpoint in --out/<stage>")
    a("--skip-bad", action="store_true", help="skip (count and report) bad rows of --data/--val-data instead of stopping")
    a("--max-bad-steps", type=int, default=5, help="stop after this many skipped steps (non-finite loss or "
      "gradient norm) in a row")
    a("--out", default=None, help="output dir (default runs/<task>)")
    args = p.parse_args(argv)
    try:   # --data a.json:2 b.json -> [("a.json", 2), ("b.json", 1)]
        args.data, args.val_data = (data.parse_files(x) if x else None for x in (args.data, args.val_data))
    except ValueError as e:
        p.error(str(e))
    if stage == "sft":  # the warm-up before GRPO: the same command line, with SFT's own steps and schedule, and
        # full fine-tuning (a random LLM warmed up through LoRA adapters only barely learns the answer format)
        args.stage, args.steps, args.lora_rank = "sft", args.sft_steps, 0
        args.lr = args.lr_merger = args.schedule = args.eval_every = args.save_every = None
    # Defaults that depend on the stage. `is None`, never `or`: an explicit 0 is the user's value (check_args
    # refuses it where it makes no sense), not a request for the default.
    sft = args.stage == "sft"
    args.steps = (args.sft_steps if sft else 200) if args.steps is None else args.steps
    args.lr = (1e-3 if sft else 1e-4) if args.lr is None else args.lr
    # The batch defaults are per step, whatever the number of ranks (torchrun sets WORLD_SIZE before we parse), so
    # `--nproc_per_node 2` on a 2-core machine is the same recipe, twice as fast, not a recipe with twice the batch.
    world = int(os.environ.get("WORLD_SIZE", 1))
    args.batch_size = max(16 // world, 1) if args.batch_size is None else args.batch_size
    args.prompts_per_rank = max(4 // world, 1) if args.prompts_per_rank is None else args.prompts_per_rank
    args.lr_merger = 2 * args.lr if args.lr_merger is None else args.lr_merger
    args.schedule = ("cosine" if sft else "constant") if args.schedule is None else args.schedule
    args.max_new_tokens = rft3d.MAX_NEW_TOKENS[args.task] if args.max_new_tokens is None else args.max_new_tokens
    args.eval_every = max(args.steps // 5, 1) if args.eval_every is None else args.eval_every
    args.save_every = max(args.steps // 5, 1) if args.save_every is None else args.save_every
    args.out = f"runs/{args.task}" if args.out is None else args.out
    safety.check_args(args, p)
    args.reward_opts = {"detection": {"iou_mode": args.iou_mode}, "grounding": {"frame_window": args.frame_window},
                        "spatial": {}}[args.task]
    args.fsdp = args.shard == "fsdp" and "RANK" in os.environ  # one process outside torchrun: nothing to shard
    return args


# --------------------------------------------------------------------------------------------------
# Distributed setup, data order, learning rate


class StepSampler:
    """Batch sampler: for optimiser step k, this rank's sample indices. Epochs are permutations seeded by
    (seed, epoch); the global batch is cut into per-rank slices, so each rank owns whole prompts (and in
    GRPO all G completions of them). A pure function of k: resuming at step k gives the same data.

    mix = [(rows, weight)] per file of a --data mix (their rows concatenated in that order): the stream is cut
    into blocks of W = sum(weights) positions, each holding `weight` rows of each file in an order shuffled by
    (seed, block), so every block has the proportions exactly; file f's rows come from its own stream of
    epochs, permuted by (seed, f + 1, epoch). Still a pure function of k."""

    def __init__(self, n, per_rank, rank, world, seed, start_step, shuffle=True, mix=None):
        self.n, self.per_rank, self.rank, self.world = n, per_rank, rank, world
        self.seed, self.step, self.shuffle, self.mix = seed, start_step, shuffle, mix

    def _stream(self, pos, n, key):
        """Position pos of an endless stream of epochs over n rows, each epoch permuted by key + (epoch,)."""
        epoch, i = divmod(pos, n)
        return int(np.random.default_rng((*key, epoch)).permutation(n)[i]) if self.shuffle else i

    def index(self, pos):
        if self.mix is None:
            return self._stream(pos, self.n, (self.seed,))
        weights = [w for _, w in self.mix]
        block, j = divmod(pos, sum(weights))   # 1. which block, which slot of it
        slots = np.random.default_rng((self.seed, block)).permutation(np.repeat(np.arange(len(weights)), weights))
        f = int(slots[j])                        # 2. the slot's file, and how many of its rows came before
        k = block * weights[f] + int((slots[:j] == f).sum())
        offset = sum(rows for rows, _ in self.mix[:f])
        return offset + self._stream(k, self.mix[f][0], (self.seed, f + 1))   # 3. that file's k-th row

    def indices(self, step):
        first = (step * self.world + self.rank) * self.per_rank  # position in the endless stream
        return [self.index(pos) for pos in range(first, first + self.per_rank)]

    def __iter__(self):
        while True:
            yield self.indices(self.step)
            self.step += 1


def lr_factor(step, args):
    """Linear warm-up to 1 over --warmup steps, then constant or a cosine to 0 over the remaining steps (the
    cosine starts where the warm-up ends: it does not decay during the warm-up)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def world(args):
    """The synthetic world's knobs (scenes.SyntheticDataset keyword arguments) from the command line."""
    return dict(frames=args.frames, size=args.image_size, pitch=args.pitch, max_objects=args.max_objects,
                spelling=args.spelling)


def datasets(args):
    """(train, val, info): datasets of data.Sample and what was read. Synthetic by default: train seeds and val
    seeds never meet. Files are checked when opened (data.py); several --data files are concatenated and
    info["mix"] = [(rows, weight)] per file tells StepSampler their proportions; several --val-data files are
    evaluated end to end. info["train"], info["val"]: per file its path, SHA-256, row counts, skipped rows."""
    skip_bad = getattr(args, "skip_bad", False)   # the --skip-bad flag, where the command line has one
    mix = None
    if args.data:
        train, train_info = data.load_files(args.task, [path for path, _ in args.data], args.media_root,
                                            args.frames, skip_bad)
        mix = [(r["kept"], w) for r, (_, w) in zip(train_info, args.data)] if len(args.data) > 1 else None
    else:
        n = args.train_size or 10**9  # 'fresh scenes forever': item i is generated from (seed, i) on demand
        train = scenes.SyntheticDataset(args.task, n, seed=1000 + args.data_seed, **world(args))
        train_info = [{"source": "synthetic", "task": args.task, "seed": 1000 + args.data_seed,
                       "n": args.train_size or "fresh scenes", **world(args)}]
    if args.val_data:
        val, val_info = data.load_files(args.task, [path for path, _ in args.val_data], args.media_root,
                                        args.frames, skip_bad)
    else:
        val = scenes.SyntheticDataset(args.task, args.val_size, seed=1, **world(args))
        val_info = [{"source": "synthetic", "task": args.task, "seed": 1, "n": args.val_size, **world(args)}]
    return train, val, {"train": train_info, "val": val_info, "mix": mix}


# --------------------------------------------------------------------------------------------------
# Models: build / load, wrap for DDP or FSDP2, checkpoints


def tiny_init(args, rank):
    """The embedded default: a tokenizer trained offline on our tasks' text and a random tiny model,
    built once by rank 0 and saved (atomically), so every rank (and every later run) loads the very same bytes."""
    init = Path(args.out) / "init"
    safety.recover(init)
    if rank == 0 and not init.is_dir():
        corpus = []
        for name, task in rft3d.TASKS.items():
            ds = scenes.SyntheticDataset(name, 200, seed=7, **world(args))
            corpus += [task.prompt(s, think=True) + task.target(s) for s in ds]
        tok = vgllm.build_tiny_tokenizer(corpus)
        torch.manual_seed(args.seed)
        net = vgllm.VGLLM(vgllm.tiny_config(len(tok), vggt=not args.no_geometry, image_size=args.image_size))
        tmp = safety.fresh_temp(init)
        checkpoints.save_pretrained(net, tok, tmp)
        safety.replace_dir(tmp, init)
        print(f"built the tiny default model ({sum(p.numel() for p in net.parameters()):,} parameters) -> {init}")
    if dist.is_initialized():
        dist.barrier()
    return str(init)


def load_model(args, rank, path=None):
    """-> (model, tokenizer) on CPU in fp32. Frozen parts (vision tower, VGGT) have requires_grad False.
    Seeded, so a freshly initialised merger (Qwen + VGGT start) is the same in policy, reference and ranks."""
    # fp32 master weights even for bf16 checkpoints: AdamW updates of ~1e-6 vanish in bf16. --bf16 computes in
    # bf16 (autocast under DDP, FSDP2's MixedPrecisionPolicy) and keeps these fp32 copies for the optimiser.
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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else {}
        for layer in net.qwen.model.language_model.layers:
            fully_shard(layer, mp_policy=MixedPrecisionPolicy(**bf16))
        # The root does not cast its inputs: FSDP's cast rebuilds every dataclass, so the Encoding objects that the
        # G rows of a group share would become G distinct ones, and encode-once and the shared prefill (both keyed
        # on object identity) would silently do G times the work. VGLLM casts the encodings itself (image_embeds).
        fully_shard(net, mp_policy=MixedPrecisionPolicy(**bf16, cast_forward_inputs=False))
        for method in ("encode", "generate"):  # called outside forward: gather the root's shards for them too
            register_fsdp_forward_method(net, method)
        return net
    if not trainable:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


def full_state(policy):
    """The full (unsharded) model state dict on CPU, on every rank; works for plain, DDP and FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(grpo.unwrap(policy), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(policy, tokenizer, optimizer, step, stage_dir, args, rank, extra):
    """model/ + state.pt, written to a temp dir and renamed: a kill mid-save keeps the last good one. state.pt is
    covered by the step directory's checksums.json (the model directory has its own)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = full_state(policy)
    optim_state = get_optimizer_state_dict(grpo.unwrap(policy), optimizer, options=opts)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)  # every rank's sampling stream, so resume continues all of them
    if rank == 0:
        final = stage_dir / f"step-{step}"
        tmp = safety.fresh_temp(final)
        checkpoints.save_pretrained(grpo.unwrap(policy), tokenizer, tmp / "model", state_dict=model_state)
        torch.save({"optimizer": optim_state, "step": step, "rng": rngs, "extra": extra}, tmp / "state.pt")
        checkpoints.seal(tmp)
        safety.replace_dir(tmp, final)
        for old in safety.step_dirs(stage_dir)[: -args.keep]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# One stage: the training loop


def train(args):
    rank, world, device = grpo.setup_distributed()
    stage_dir = Path(args.out) / args.stage
    task = rft3d.TASKS[args.task]
    train_set, val_set, data_info = datasets(args)  # first: a bad data file stops the run before a model loads

    # 1. Start point: --model, else the SFT result for GRPO (main() runs the warm-up if it is missing), else
    #    (None) the Qwen + VGGT pair or the tiny default. A resumed run loads its newest intact checkpoint instead.
    start = start_point(args)
    ckpt, net, tokenizer, state = safety.resume_point(args, rank, stage_dir, lambda path: load_model(args, rank, path)) if args.resume else (None,) * 4
    if ckpt is None:
        net, tokenizer = load_model(args, rank, start)
    if args.lora_rank:  # saves merge the adapters, so a --resume restarts them from the merged weights (not exact)
        lora.apply_lora(net, rank=args.lora_rank, alpha=2 * args.lora_rank)
    if args.grad_ckpt:
        net.enable_gradient_checkpointing()
    ref = None
    if args.stage == "grpo" and args.beta > 0:  # the frozen reference: the start point, never updated
        ref, _ = load_model(args, rank, start)
        ref.requires_grad_(False).eval()
        ref = wrap(ref, args, device, trainable=False)
    policy = wrap(net, args, device)

    # 2. Optimiser: AdamW, separate learning rates for the LLM and the geometry merger (VG-LLM: 5e-6 / 1e-5).
    model = grpo.unwrap(policy)
    merger = {id(p) for p in model.merger.parameters()} if model.merger is not None else set()
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in merger], "lr": args.lr, "base_lr": args.lr},
              {"params": [p for p in params if id(p) in merger], "lr": args.lr_merger, "base_lr": args.lr_merger}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    step, best = 0, {"value": -float("inf")}
    if ckpt:  # 3. Exact resume: optimiser moments, step, data position, and (below) every rank's RNG stream.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        if args.lora_rank:  # the saved moments belong to adapters that were merged away: never put them on new ones
            if rank == 0:
                print("--resume with LoRA: the checkpoint holds merged weights, so the adapters and AdamW's moments "
                      "start fresh (not bit-exact; full fine-tuning resumes exactly)")
        else:
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        step, best = state["step"], state["extra"]["best"]

    # 4. Data: each rank reads its own slice of every global batch.
    per_rank = args.batch_size if args.stage == "sft" else args.prompts_per_rank
    sampler = StepSampler(len(train_set), per_rank, rank, world, args.seed, step, shuffle=len(train_set) < 10**7,
                          mix=data_info["mix"])
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=data.collate,
                                              num_workers=args.workers))
    # Seed (or restore) the sampling stream only now: creating the loader iterator draws from torch's RNG.
    if state is not None:
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if state["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"])
    else:
        torch.manual_seed(args.seed + rank)  # per-rank sampling streams
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in params)
        print(f"[{args.stage}/{args.task}] {world} rank(s) on {device}, {args.shard}; trainable {n_train:,} params")
        if args.shard == "fsdp" and not args.fsdp:
            print("  --shard fsdp outside torchrun: one process, nothing to shard; the model runs unwrapped"
                  + (" with bf16 autocast (--bf16)" if args.bf16 else ""))
        if not args.data and model.config["image_width"] != args.image_size:
            print(f"  --image-size {args.image_size}: this model resizes every frame to {model.config['image_width']} "
                  "px wide (its config's image_width)")
        if args.stage == "sft":
            print(f"  batch: {per_rank} samples/rank x {world} ranks = {per_rank * world} per step, micro-batch {args.micro_batch}")
        else:
            print(f"  batch: {per_rank} prompts/rank x G={args.G} = {per_rank * args.G} completions/rank, "
                  f"{per_rank * args.G * world} per step, micro-batch {args.micro_batch} "
                  f"({math.ceil(per_rank * args.G / args.micro_batch)} micro-steps), mu={args.mu}, beta={args.beta}")
        print("  " + json.dumps({k: v for k, v in vars(args).items() if k != "reward_opts"}))
        for split in ("train", "val"):
            for r in data_info[split]:
                print(f"  {split} " + data.describe(r).replace("\n", "\n  "))
        safety.save_data_report(stage_dir, data_info, step)
        for name in ("metrics.jsonl", "samples.jsonl"):  # a resumed run rewrites what came after its checkpoint
            safety.truncate_log(stage_dir / name, step)
    log = open(stage_dir / "metrics.jsonl", "a") if rank == 0 else None
    samples_log = open(stage_dir / "samples.jsonl", "a") if rank == 0 else None

    # 5. The loop.
    bad_in_a_row, t_loop, first = 0, time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.stage} {args.task}", disable=rank != 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and not args.fsdp)
    while step < args.steps:
        samples = next(loader)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, args)
        t_step = time.time()
        with autocast:
            if args.stage == "sft":
                out = grpo.sft_step(policy, tokenizer, task, samples, optimizer, args.micro_batch, args.max_grad_norm)
            else:
                out = grpo.grpo_step(policy, ref, tokenizer, task, samples, optimizer, args)
        out.setdefault("step_time", time.time() - t_step)  # GRPO times its own phases; SFT: the whole step
        step += 1
        bad_in_a_row = bad_in_a_row + 1 if out["skipped"] else 0  # a non-finite loss or gradient norm
        if bad_in_a_row >= args.max_bad_steps:
            raise RuntimeError(f"{bad_in_a_row} skipped steps in a row at step {step} (non-finite loss or gradient "
                               "norm): lower --lr or check the data")
        texts = out.pop("_texts", None)
        if rank == 0:
            out.update(step=step, lr=optimizer.param_groups[0]["lr"])
            log.write(safety.json_line(out))
            log.flush()
            bar.update(1)
            bar.set_postfix({k: f"{out[k]:.3f}" for k in ("loss", "reward") if k in out})
            if step == first + 5:  # how long this part takes, said early (tqdm's estimate then keeps it current)
                tqdm.write(f"[{args.stage}] {args.steps - first} steps: about "
                           f"{(time.time() - t_loop) / 5 * (args.steps - first) / 60:.0f} min at the first steps' pace, "
                           f"plus {math.ceil((args.steps - first) / args.eval_every)} evaluations on {len(val_set)} scenes")
            if texts and step % args.log_every == 0:
                samples_log.write(safety.json_line({"step": step, "completions": texts[: args.G]}))
                samples_log.flush()
        if step % args.eval_every == 0 or step == args.steps:
            with autocast:  # the dtype training computes in (DDP: autocast; FSDP: its bf16 parameters)
                metrics = evaluate(model, tokenizer, args.task, val_set, max_new_tokens=args.max_new_tokens,
                                   synced_gpus=args.fsdp)["metrics"]
            if rank == 0:
                log.write(safety.json_line({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}))
                log.flush()
                shown = [PRIMARY_METRIC[args.task], "parse_rate", "iou_gt", "n_pred", "count_acc", "iou", "frame_acc"]
                tqdm.write(f"step {step}: eval " + ", ".join(f"{k} {metrics[k]:.3f}" for k in shown if k in metrics))
            value = metrics[PRIMARY_METRIC[args.task]]
            if value > best["value"]:
                best = {"value": value, "step": step}
                save_model(policy, tokenizer, stage_dir / "best", rank)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(policy, tokenizer, optimizer, step, stage_dir, args, rank, {"best": best})
    bar.close()
    save_model(policy, tokenizer, stage_dir / "final", rank)
    if rank == 0:
        print(f"[{args.stage}] done: {stage_dir / 'final'} (best {PRIMARY_METRIC[args.task]} "
              f"{best['value']:.4f} at step {best.get('step')})")
    return stage_dir / "final"


def save_model(policy, tokenizer, path, rank):
    """A plain model directory (LoRA merged), written to a temp dir and renamed over the old one."""
    state = full_state(policy)
    if rank == 0:
        tmp = safety.fresh_temp(path)
        checkpoints.save_pretrained(grpo.unwrap(policy), tokenizer, tmp, state_dict=state)
        safety.replace_dir(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def report(args, start, rank, device):
    """The main command's last part (synthetic data): the SFT start and the GRPO result, each the best on validation,
    greedy on the same --test-size unseen test scenes (seed 2), side by side with paired per-scene differences and
    their standard errors (DESIGN.md section 9), and grpo/curves.png: the training reward and the validation metric
    over the steps. A single run is one seed: bench.py learning makes the claim with seeds and learning-rate sweeps."""
    test = scenes.SyntheticDataset(args.task, args.test_size, seed=2, **world(args))
    grpo_dir = Path(args.out) / "grpo"
    per = {}
    for name, path in (("SFT start", Path(start)), ("GRPO", grpo_dir / "best")):
        safety.recover(path)
        net, tok = checkpoints.load_pretrained(path)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):  # as training evaluated
            records = evaluate(net.to(device), tok, args.task, test, max_new_tokens=args.max_new_tokens,
                               progress=True)["records"]
        per[name] = compare.per_scene(args.task, records)
    if rank != 0:
        return
    print(f"\n== {args.task}: the SFT start ({start}) vs GRPO ({grpo_dir / 'best'}), {args.test_size} unseen test "
          f"scenes, paired per scene (mean +- standard error) ==")
    diffs = compare.compare_table(args.task, per, base="SFT start")
    print(compare.claim(args.task, diffs["GRPO"]) + " (one run, one seed)")
    compare.training_curves(grpo_dir / "curves.png", grpo_dir / "metrics.jsonl", PRIMARY_METRIC[args.task], args.task,
                            args.val_size)
    means = {k: {m: float(np.nanmean(v)) for m, v in d.items()} for k, d in per.items()}
    (grpo_dir / "report.json").write_text(json.dumps({"test_size": args.test_size, "start": str(start), "diffs": diffs,
                                                       "means": means}, indent=1))
    print(f"wrote {grpo_dir / 'curves.png'} and {grpo_dir / 'report.json'}")


def start_point(args):
    """What a stage starts from: --model; else, for GRPO, the SFT warm-up's best model on validation (the paper's RL
    start: the SFT model, early-stopped); else None (the Qwen + VGGT pair or the tiny default)."""
    if args.model or args.qwen or args.stage != "grpo":
        return args.model
    safety.recover(Path(args.out) / "sft" / "best")
    return str(Path(args.out) / "sft" / "best")


def main(argv=None):
    args = get_args(argv)
    safety.set_threads()
    sft_final = Path(args.out) / "sft" / "final"
    safety.recover(sft_final)
    warmup = args.stage == "grpo" and not (args.model or args.qwen) and not (sft_final / "config.json").exists()
    sft_args = get_args(argv, stage="sft") if warmup else None
    safety.check_out(args, warmup)
    try:
        if warmup:
            # The paper: RL from an un-warmed model gets no reward signal (no parseable answers), so GRPO on
            # the embedded default starts from an SFT warm-up, which we run here first, with SFT defaults
            # (with --resume it continues from the warm-up's own newest checkpoint).
            if os.environ.get("RANK", "0") == "0":
                print(f"no SFT checkpoint at {sft_final}: running the SFT warm-up first (python train.py --stage sft). "
                      f"Three parts: SFT warm-up ({sft_args.steps} steps), GRPO ({args.steps} steps), then the start-vs-GRPO "
                      f"table on {args.test_size} test scenes; each says how long it takes when it starts")
            train(sft_args)
        train(args)
        if args.stage == "grpo" and not args.data and args.test_size:  # the main command ends with its result
            rank, _, device = grpo.setup_distributed()
            report(args, start_point(args), rank, device)
    except checkpoints.CheckpointError as e:  # a damaged --model, init/ or sft/final: name the file, no traceback
        init = Path(args.out) / "init"
        safety.fail(f"{e}" + (f" (delete {init} to rebuild it from --seed)" if str(init) in str(e) else ""), code=1)
    except data.DataError as e:  # a bad --data / --val-data file or row: its name and row, no traceback
        safety.fail(str(e), code=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
