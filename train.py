"""train.py: SFT and GRPO for 3D-RFT, one process or many (torchrun; DDP or FSDP2), CPU or GPU.

    python train.py --stage sft  --task detection            # tiny model, synthetic scenes, CPU, minutes
    python train.py --stage grpo --task detection            # runs the SFT warm-up first if none is found
    torchrun --nproc_per_node 8 train.py --stage grpo --task grounding --model VG-LLM-4B \
        --data scanrefer_train_32frames.json --media-root data/media --bf16 --shard fsdp ...

Layout of --out (default runs/<task>):
    init/                  the tiny random model + tokenizer this run started from (embedded default only)
    <stage>/step-<k>/      model/ (safetensors + config + tokenizer) and state.pt (optimiser, RNG, step)
    <stage>/final/, best/  the last model and the best one on the validation set
    <stage>/metrics.jsonl  one JSON line per step and per evaluation; samples.jsonl: a few completions
    <stage>/data.json      what the run read: per file its SHA-256, rows, rows per type, skipped rows (data.py)
"""
import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import grpo
import model as vgllm
import rft3d
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
      "of all files (weights ignored; default: synthetic)")
    a("--media-root", default=None, help="root of the image/video paths in --data")
    a("--train-size", type=int, default=0, help="synthetic: fixed training set size (0 = fresh scenes forever)")
    a("--val-size", type=int, default=100, help="synthetic validation scenes for periodic eval")
    a("--data-seed", type=int, default=0, help="synthetic training scenes (fixed apart from --seed: same set, new run)")
    a("--frames", type=int, default=4, help="frames sampled per video / scene")
    a("--image-size", type=int, default=56, help="synthetic frame size in pixels")
    a("--pitch", type=float, default=0.0, help="synthetic: camera pitch in degrees (0: level, boxes need one angle)")
    a("--max-objects", type=int, default=3, help="synthetic: objects per scene, at most")
    a("--spelling", choices=["canonical", "random"], default="canonical",
      help="synthetic: target boxes/order spelled one way, or a random one of the equivalent spellings")
    a("--steps", type=int, default=None, help="optimiser steps (default: sft 1500, grpo 200)")
    a("--sft-steps", type=int, default=1500, help="steps of the SFT warm-up that GRPO runs when it finds none")
    a("--batch-size", type=int, default=16, help="SFT samples per rank per step")
    a("--prompts-per-rank", type=int, default=4, help="GRPO prompts per rank per step (x G completions)")
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
    a("--iou-mode", choices=["paper", "robust", "gt"], default="paper", help="detection IoU reward term (rewards.detection_reward)")
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
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out/<stage>")
    a("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    a("--out", default=None, help="output dir (default runs/<task>)")
    args = p.parse_args(argv)
    try:   # --data a.json:2 b.json -> [("a.json", 2), ("b.json", 1)]
        args.data, args.val_data = (data.parse_files(x) if x else None for x in (args.data, args.val_data))
    except ValueError as e:
        p.error(str(e))
    if stage == "sft":  # the warm-up before GRPO: the same command line, with SFT's own steps and schedule
        args.stage, args.steps, args.resume = "sft", args.sft_steps, False
        args.lr = args.lr_merger = args.schedule = args.eval_every = args.save_every = None
    sft = args.stage == "sft"
    args.steps = args.steps or (1500 if sft else 200)
    args.lr = args.lr or (1e-3 if sft else 1e-4)
    args.lr_merger = args.lr_merger or 2 * args.lr
    args.schedule = args.schedule or ("cosine" if sft else "constant")
    args.max_new_tokens = args.max_new_tokens or rft3d.MAX_NEW_TOKENS[args.task]
    args.eval_every = args.eval_every or max(args.steps // 5, 1)
    args.save_every = args.save_every or max(args.steps // 5, 1)
    args.out = args.out or f"runs/{args.task}"
    args.reward_opts = {"iou_mode": args.iou_mode} if args.task == "detection" else {}
    args.fsdp = args.shard == "fsdp"
    return args


# --------------------------------------------------------------------------------------------------
# Distributed setup, data order, learning rate


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is one process, no dist."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # SFT warm-up and GRPO run in one process: initialise once
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


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
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    if args.schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))


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


def save_data_report(stage_dir, info, step):
    """<stage>/data.json = {"starts": [{"step", "train", "val", "mix"}, ...]}: what each start of this stage read
    (a --resume appends one), so two runs compare by their files' SHA-256s and counts. Warns when a resumed
    run reads other training files than the start before it."""
    path = stage_dir / "data.json"
    starts = json.loads(path.read_text())["starts"] if step and path.exists() else []
    if starts and [r.get("sha256") for r in starts[-1]["train"]] != [r.get("sha256") for r in info["train"]]:
        print(f"warning: resuming at step {step} on other training data than the run started with (see {path})")
    tmp = path.with_name(".tmp-data.json")
    tmp.write_text(json.dumps({"starts": starts + [{"step": step, **info}]}, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Models: build / load, wrap for DDP or FSDP2, checkpoints


def tiny_init(args, rank):
    """The embedded default: a tokenizer trained offline on our tasks' text and a random tiny model,
    built once by rank 0 and saved, so every rank (and every later run) loads the very same bytes."""
    init = Path(args.out) / "init"
    if rank == 0 and not (init / "config.json").exists():
        corpus = []
        for name, task in rft3d.TASKS.items():
            ds = scenes.SyntheticDataset(name, 200, seed=7, **world(args))
            corpus += [task.prompt(s, think=True) + task.target(s) for s in ds]
        tok = vgllm.build_tiny_tokenizer(corpus)
        torch.manual_seed(args.seed)
        net = vgllm.VGLLM(vgllm.tiny_config(len(tok), vggt=not args.no_geometry))
        checkpoints.save_pretrained(net, tok, init)
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
    if "use_vggt_feature" in json.loads((Path(path) / "config.json").read_text()):
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
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else MixedPrecisionPolicy()
        for layer in net.qwen.model.language_model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
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
    """model/ + state.pt, written to a temp dir and renamed: a crash mid-save keeps the last good one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = full_state(policy)
    optim_state = get_optimizer_state_dict(grpo.unwrap(policy), optimizer, options=opts)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)  # every rank's sampling stream, so resume continues all of them
    if rank == 0:
        tmp, final = stage_dir / f".tmp-step-{step}", stage_dir / f"step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints.save_pretrained(grpo.unwrap(policy), tokenizer, tmp / "model", state_dict=model_state)
        torch.save({"optimizer": optim_state, "step": step, "rng": rngs, "extra": extra}, tmp / "state.pt")
        os.replace(tmp, final)
        for old in sorted(stage_dir.glob("step-*"), key=lambda d: int(d.name[5:]))[: -args.keep]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(stage_dir):
    steps = sorted(stage_dir.glob("step-*"), key=lambda d: int(d.name[5:]))
    return steps[-1] if steps else None


# --------------------------------------------------------------------------------------------------
# One stage: the training loop


def train(args):
    rank, world, device = setup_distributed()
    stage_dir = Path(args.out) / args.stage
    task = rft3d.TASKS[args.task]

    # 1. Start point: --model, else the SFT result for GRPO (main() runs the warm-up if it is missing), else
    #    (None) the Qwen + VGGT pair or the tiny default. A resumed run loads its checkpoint instead.
    start = args.model or (str(Path(args.out) / "sft" / "final") if args.stage == "grpo" and not args.qwen else None)
    ckpt = latest_checkpoint(stage_dir) if args.resume else None
    net, tokenizer = load_model(args, rank, str(ckpt / "model") if ckpt else start)
    if args.lora_rank:  # saves merge the adapters, so a --resume restarts them from the merged weights (not exact)
        vgllm.apply_lora(net, rank=args.lora_rank, alpha=2 * args.lora_rank)
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
    step, best, state = 0, {"value": -float("inf")}, None
    if ckpt:  # 3. Exact resume: optimiser moments, step, data position, and (below) every rank's RNG stream.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(ckpt / "state.pt", weights_only=True)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        step, best = state["step"], state["extra"]["best"]

    # 4. Data: each rank reads its own slice of every global batch.
    train_set, val_set, data_info = datasets(args)
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
        save_data_report(stage_dir, data_info, step)
    log = open(stage_dir / "metrics.jsonl", "a") if rank == 0 else None
    samples_log = open(stage_dir / "samples.jsonl", "a") if rank == 0 else None

    # 5. The loop.
    bad_in_a_row = 0
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.stage} {args.task}", disable=rank != 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and not args.fsdp)
    while step < args.steps:
        samples = next(loader)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, args)
        with autocast:
            if args.stage == "sft":
                out = grpo.sft_step(policy, tokenizer, task, samples, optimizer, args.micro_batch, args.max_grad_norm)
            else:
                out = grpo.grpo_step(policy, ref, tokenizer, task, samples, optimizer, args)
        step += 1
        bad_in_a_row = bad_in_a_row + 1 if math.isnan(out["grad_norm"]) else 0
        if bad_in_a_row >= args.max_bad_steps:
            raise RuntimeError(f"{bad_in_a_row} non-finite losses in a row at step {step}: lower --lr or check the data")
        texts = out.pop("_texts", None)
        if rank == 0:
            out.update(step=step, lr=optimizer.param_groups[0]["lr"], skipped=int(math.isnan(out["grad_norm"])))
            log.write(json.dumps(out) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix({k: f"{out[k]:.3f}" for k in ("loss", "reward") if k in out})
            if texts and step % args.log_every == 0:
                samples_log.write(json.dumps({"step": step, "completions": texts[: args.G]}) + "\n")
                samples_log.flush()
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(model, tokenizer, args.task, val_set, max_new_tokens=args.max_new_tokens,
                               synced_gpus=args.fsdp)["metrics"]
            if rank == 0:
                log.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}) + "\n")
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
    """A plain model directory (LoRA merged), written atomically."""
    state = full_state(policy)
    if rank == 0:
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints.save_pretrained(grpo.unwrap(policy), tokenizer, tmp, state_dict=state)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    args = get_args(argv)
    sft_final = Path(args.out) / "sft" / "final"
    if args.stage == "grpo" and not (args.model or args.qwen) and not (sft_final / "config.json").exists():
        # The paper: RL from an un-warmed model gets no reward signal (no parseable answers), so GRPO on
        # the embedded default starts from an SFT warm-up, which we run here first, with SFT defaults.
        print(f"no SFT checkpoint at {sft_final}: running the SFT warm-up first (python train.py --stage sft)")
        train(get_args(argv, stage="sft"))
    train(args)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
