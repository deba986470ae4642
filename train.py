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
import copy
import dataclasses
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
import compare
import data
import grpo
import lora
import model as vgllm
import rft3d
import rollout_vllm
import safety
import scenes
from eval import PRIMARY_METRIC, evaluate

# --------------------------------------------------------------------------------------------------
# The knobs. `-h` shows the common ones on one screen; `--help-all` the rare ones too.


def parser(full=False):
    p = argparse.ArgumentParser(
        usage="python train.py [--stage sft|grpo] [--task T] [flags]   (torchrun ... for many)",
        description="SFT and GRPO for 3D-RFT; defaults: the tiny model on synthetic scenes, a CPU.",
        epilog="--help-all: also the rare flags (schedule, checkpoint cadence, reward variants, "
               "the synthetic world, rollout engine, robustness).",
        formatter_class=lambda prog: argparse.MetavarTypeHelpFormatter(prog, max_help_position=34,
                                                                   width=100))
    rare = (lambda text: text) if full else (lambda text: argparse.SUPPRESS)
    p.add_argument("--help-all", action="store_true", help="show the rare flags too")
    a = p.add_argument_group("stage, task, start point").add_argument
    a("--stage", type=str, choices=["sft", "grpo"], default="grpo",
      help="SFT (cross-entropy) or GRPO")
    a("--task", type=str, choices=sorted(rft3d.TASKS), default="detection", help="which 3D task")
    a("--model", type=str, help="start: our save or a VG-LLM dir (default: the SFT result)")
    a("--qwen", type=str, help="start: a Qwen2.5-VL dir (+ --vggt: the paper's base)")
    a("--vggt", type=str, help="VGGT-1B model.safetensors / model.pt")
    a = p.add_argument_group("data (default: synthetic scenes)").add_argument
    a("--data", nargs="+", type=str, metavar="FILE[:W]",
      help="VG-LLM / VSI-Bench file(s), a mix by weights W")
    a("--val-data", nargs="+", type=str, metavar="FILE",
      help="validation file(s), every row (with --data)")
    a("--media-root", type=str, help="root of the image/video paths in --data")
    a("--frames", type=int, default=4, help="frames per video / scene")
    a("--train-size", type=int, default=0, help=rare("fixed training set size (0: fresh scenes)"))
    a("--val-size", type=int, default=100, help=rare("validation scenes for periodic eval"))
    a("--test-size", type=int, default=400, help=rare("GRPO: test scenes of the closing "
      "start-vs-GRPO table (0: skip it)"))
    a("--data-seed", type=int, default=0, help=rare("training scenes (a new --seed: same set)"))
    scenes.add_world_args(p, shown=full)
    a = p.add_argument_group("optimisation (batch defaults: per step, over all ranks)").add_argument
    a("--steps", type=int, help="optimiser steps (sft: --sft-steps, grpo: 200)")
    a("--lr", type=float, help="LLM lr (sft 3e-4, grpo 1e-4; real models ~5e-6)")
    a("--batch-size", type=int, help="SFT samples per rank (default: 16 a step)")
    a("--prompts-per-rank", type=int, help="GRPO prompts per rank, x G (default: 4 a step)")
    a("--micro-batch", type=int, default=16, help="sequences per forward (accumulating gradients)")
    a("--sft-steps", type=int, default=1600, help=rare("warm-up SFT steps when GRPO finds none"))
    a("--lr-merger", type=float, help=rare("geometry-merger learning rate (default: 2 x --lr)"))
    a("--warmup", type=int, default=20, help=rare("linear warm-up steps"))
    a("--schedule", type=str, choices=["cosine", "constant"],
      help=rare("after warm-up (default: sft cosine, grpo constant)"))
    a("--max-grad-norm", type=float, default=1.0, help=rare("gradient clipping"))
    a = p.add_argument_group("sampling and GRPO").add_argument
    a("--G", type=int, default=8, help="completions per prompt")
    a("--temperature", type=float, default=1.0, help="sampling temperature (and of the scores)")
    a("--max-new-tokens", type=int, help="completion length cap (default: the task's)")
    a("--beta", type=float, default=0.04, help="k3 KL weight (0: no reference model)")
    a("--eps-low", type=float, default=0.2, help="lower clip range of the ratio")
    a("--eps-high", type=float, default=0.2, help="upper clip range (> eps-low: clip-higher)")
    a("--mu", type=int, default=1, help="updates per rollout (1: the ratio is exactly 1)")
    a("--adv-scale", type=str, choices=["group", "batch", "none"], default="group",
      help="advantage: / std of")
    a("--agg", type=str, choices=["token", "seq", "drgrpo"], default="token",
      help="loss aggregation")
    a("--iou-mode", type=str, choices=["paper", "robust", "gt"], default="paper",
      help="detection IoU term (DESIGN.md 4)")
    a("--f1-iou", type=float, default=0.25, help=rare("detection F1 term's IoU threshold (0.5: "
      "reward F1@0.5)"))
    a("--frame-window", type=str, choices=["scaled", "fixed"], default="scaled",
      help=rare("grounding frame window: tau = 5 S / 32, or the paper's fixed 5"))
    a("--rollout", type=str, choices=["own", "vllm"], default="own",
      help=rare("GRPO's sampler: our decode loop or a vLLM engine per rank"))
    a = p.add_argument_group("model, hardware, run").add_argument
    a("--lora-rank", type=int, default=0, help="LoRA on the LLM linears (0: full fine-tuning)")
    a("--bf16", action="store_true", help="bf16 compute, fp32 master weights (GPU)")
    a("--shard", type=str, choices=["ddp", "fsdp"], default="ddp",
      help="DDP or FSDP2 under torchrun")
    a("--seed", type=int, default=0, help="seed (rank r samples with seed + r)")
    a("--resume", action="store_true", help="continue from --out/<stage>'s newest checkpoint")
    a("--out", type=str, help="output dir (default runs/<task>)")
    a("--no-geometry", action="store_true", help=rare("tiny model without VGGT (ablation)"))
    a("--grad-ckpt", action="store_true", help=rare("gradient checkpointing of the LLM layers"))
    a("--workers", type=int, default=0, help=rare("data-loader processes (frame decoding)"))
    a("--eval-every", type=int, help=rare("steps between evaluations (default: steps // 5)"))
    a("--save-every", type=int, help=rare("steps between checkpoints (default: steps // 5)"))
    a("--keep", type=int, default=2, help=rare("checkpoints to keep"))
    a("--log-every", type=int, default=10, help=rare("steps between sample logs"))
    a("--skip-bad", action="store_true", help=rare("skip and count bad data rows, don't stop"))
    a("--max-bad-steps", type=int, default=5, help=rare("non-finite steps in a row that stop it"))
    return p


def parse(argv=None):
    """-> (parser, the flags as given); --help-all prints every flag and exits."""
    p = parser()
    args = p.parse_args(argv)
    if args.help_all:
        parser(full=True).print_help()
        sys.exit(0)
    del args.help_all  # not a flag of the run
    return p, args


def get_args(argv=None, stage=None):
    """The flags of a command line, completed for --stage (or `stage`: "sft" for the warm-up)."""
    return finish_args(*parse(argv), stage)


def finish_args(p, args, stage=None):
    """Stage defaults, --data's FILE[:W], the checks. stage="sft": the warm-up of a GRPO command
    line, with SFT's own steps, schedule and full fine-tuning. `is None`: an explicit 0 is the
    user's value (check_args refuses it where it makes no sense). The flags as given stay as
    they are: main() completes them twice, for the warm-up and for GRPO."""
    args = copy.copy(args)
    try:  # --data a.json:2 b.json -> [("a.json", 2), ("b.json", 1)]
        args.data, args.val_data = (data.parse_files(x) if x else None
                                    for x in (args.data, args.val_data))
    except ValueError as e:
        p.error(str(e))
    if stage == "sft":  # the GRPO command line's own steps, rates and schedule are not SFT's
        args.stage, args.lora_rank = "sft", 0
        args.steps = args.lr = args.lr_merger = args.schedule = None
        args.eval_every = args.save_every = None
    sft = args.stage == "sft"
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # batch defaults are per step, whatever the ranks
    fill = lambda defaults: vars(args).update(
        {k: v for k, v in defaults.items() if getattr(args, k) is None})
    fill(dict(steps=args.sft_steps if sft else 200, lr=3e-4 if sft else 1e-4,
              schedule="cosine" if sft else "constant", batch_size=max(16 // ranks, 1),
              prompts_per_rank=max(4 // ranks, 1), out=f"runs/{args.task}",
              max_new_tokens=rft3d.MAX_NEW_TOKENS[args.task]))
    fill(dict(lr_merger=2 * args.lr, eval_every=max(args.steps // 5, 1),
              save_every=max(args.steps // 5, 1)))  # these follow the ones above
    safety.check_args(args, p)
    args.reward_opts = {"detection": {"iou_mode": args.iou_mode, "f1_iou": args.f1_iou},
                        "grounding": {"frame_window": args.frame_window}, "spatial": {}}[args.task]
    args.fsdp = args.shard == "fsdp" and "RANK" in os.environ  # one process: nothing to shard
    return args


def grpo_config(args, model, tokenizer, rank):
    """GRPO's hyper-parameters from the flags, once per stage (--rollout vllm: its sampler)."""
    names = {f.name for f in dataclasses.fields(grpo.GRPOConfig)} - {"synced_gpus", "sampler"}
    sampler = (rollout_vllm.sampler(model, tokenizer, seed=args.seed + rank, bf16=args.bf16)
               if args.rollout == "vllm" else None)
    return grpo.GRPOConfig(**{k: getattr(args, k) for k in names}, synced_gpus=args.fsdp,
                           sampler=sampler)


# --------------------------------------------------------------------------------------------------
# Learning rate, data (the data order is data.StepSampler)


def lr_factor(step, args):
    """Linear warm-up to 1, then constant or a cosine to 0 (starting where the warm-up ends)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def datasets(args):
    """-> (train, val, what was read): the --data / --val-data files (data.py), else synthetic
    scenes (train and val seeds never meet; fresh scenes: item i made on demand)."""
    def split(files, n, seed):
        if files:
            return data.load_files(args.task, [path for path, _ in files], args.media_root,
                                   args.frames, args.skip_bad)
        world = scenes.world(args)
        return (scenes.SyntheticDataset(args.task, n or 10**9, seed=seed, **world),
                [{"source": "synthetic", "task": args.task, "seed": seed,
                  "n": n or "fresh scenes", **world}])
    train_set, train_info = split(args.data, args.train_size, 1000 + args.data_seed)
    val_set, val_info = split(args.val_data, args.val_size, 1)
    mix = ([(r["kept"], w) for r, (_, w) in zip(train_info, args.data)]  # StepSampler's weights
           if args.data and len(args.data) > 1 else None)
    return train_set, val_set, {"train": train_info, "val": val_info, "mix": mix}


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
            ds = scenes.SyntheticDataset(name, 200, seed=7, **scenes.world(args))
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
    """-> (model, tokenizer) on the CPU in fp32 (--bf16 computes in bf16 and keeps these fp32
    masters: AdamW updates of ~1e-6 vanish in bf16); frozen parts have requires_grad False.
    Seeded: a fresh merger (Qwen + VGGT start) is the same in policy, reference and ranks."""
    torch.manual_seed(args.seed)
    if path is None and args.qwen:
        return checkpoints.from_qwen_and_vggt(args.qwen, args.vggt, dtype=torch.float32)
    return checkpoints.load(path or tiny_init(args, rank), dtype=torch.float32)


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
    rank, world, device = safety.setup_distributed()
    stage_dir, task = Path(args.out) / args.stage, rft3d.TASKS[args.task]
    train_set, val_set, data_info = datasets(args)  # first: a bad data file stops before any model

    # 1. The models: the start point, or with --resume the newest intact checkpoint (state.pt).
    policy, ref, tokenizer, state = start_models(args, rank, device, stage_dir)
    model = grpo.unwrap(policy)
    hp = grpo_config(args, model, tokenizer, rank) if args.stage == "grpo" else None

    # 2. Optimiser: AdamW, the LLM at --lr, the geometry merger at --lr-merger.
    optimizer = build_optimizer(policy, args)
    step, best = 0, {"value": -float("inf")}
    if state is not None:  # exact resume: optimiser moments, step, data position, RNG streams
        safety.resume_optimizer(model, optimizer, state, args, rank)
        step, best = state["step"], state["extra"]["best"]

    # 3. Data: each rank reads its own slice of every global batch.
    per_rank = args.batch_size if args.stage == "sft" else args.prompts_per_rank
    sampler = data.StepSampler(len(train_set), per_rank, rank, world, args.seed, step,
                               shuffle=len(train_set) < 10**7, mix=data_info["mix"])
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler,
                                              collate_fn=data.collate, num_workers=args.workers))
    # Seed (or restore) the per-rank sampling streams only now: the loader iterator draws from them.
    safety.restore_rng(state["rng"][rank]) if state else torch.manual_seed(args.seed + rank)
    if rank == 0:
        safety.announce(args, world, device, model, per_rank, data_info)
    log, samples_log = safety.open_logs(stage_dir, data_info, step) if rank == 0 else (None, None)

    # 4. The loop: a step of the stage's objective, then log, validate (best/), save.
    bad_in_a_row, t_loop, first = 0, time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.stage} {args.task}", disable=rank != 0)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16 and not args.fsdp)
    while step < args.steps:
        samples = next(loader)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, args)
        with autocast:
            if args.stage == "sft":
                out, texts = grpo.sft_step(policy, tokenizer, task, samples, optimizer,
                                           args.micro_batch, args.max_grad_norm), None
            else:
                out, texts = grpo.grpo_step(policy, ref, tokenizer, task, samples, optimizer, hp)
        step += 1
        bad_in_a_row = safety.count_skipped(bad_in_a_row, out["skipped"], step, args.max_bad_steps)
        if rank == 0:
            out.update(step=step, lr=optimizer.param_groups[0]["lr"])
            safety.log_step(args, out, texts, log, samples_log, bar, first, t_loop, len(val_set))
        if step % args.eval_every == 0 or step == args.steps:
            value = validate(model, tokenizer, val_set, args, autocast, step, log, rank)
            if value > best["value"]:
                best = {"value": value, "step": step}
                safety.save_model(model, tokenizer, stage_dir / "best", rank)
        if step % args.save_every == 0 or step == args.steps:
            safety.save_checkpoint(model, tokenizer, optimizer, step, stage_dir, args, rank,
                                   {"best": best})
    bar.close()
    safety.save_model(model, tokenizer, stage_dir / "final", rank)
    if rank == 0:
        print(f"[{args.stage}] done: {stage_dir / 'final'} (best {PRIMARY_METRIC[args.task]} "
              f"{best['value']:.4f} at step {best.get('step')})")
    return stage_dir / "final"


def start_models(args, rank, device, stage_dir):
    """-> (policy, ref, tokenizer, state or None): the start point (start_point), or with --resume
    the newest intact checkpoint; ref: GRPO's frozen reference (--beta > 0), the start point."""
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
        ref = wrap(ref.requires_grad_(False).eval(), args, device, trainable=False)
    return wrap(net, args, device), ref, tokenizer, state


def build_optimizer(policy, args):
    """AdamW: the LLM at --lr, the geometry merger at --lr-merger (VG-LLM: 5e-6 / 1e-5)."""
    model = grpo.unwrap(policy)
    merger = {id(p) for p in model.merger.parameters()} if model.merger is not None else set()
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in merger], "base_lr": args.lr},
              {"params": [p for p in params if id(p) in merger], "base_lr": args.lr_merger}]
    return torch.optim.AdamW([dict(g, lr=g["base_lr"]) for g in groups if g["params"]],
                             weight_decay=0.0)


def validate(model, tokenizer, val_set, args, autocast, step, log, rank):
    """Evaluate on the validation set, log it (rank 0) -> the primary metric (picks best/)."""
    with autocast:  # the dtype training computes in (DDP: autocast; FSDP: its bf16 parameters)
        metrics = evaluate(model, tokenizer, args.task, val_set, max_new_tokens=args.max_new_tokens,
                           synced_gpus=args.fsdp)["metrics"]
    if rank == 0:
        safety.log_eval(log, step, metrics, PRIMARY_METRIC[args.task])
    return metrics[PRIMARY_METRIC[args.task]]


# --------------------------------------------------------------------------------------------------
# The main command: the SFT warm-up if needed, the stage, the closing start-vs-GRPO table


def report(args, start, rank, device):
    """The main command's closing table: the SFT start and GRPO (its best on validation) on
    the same unseen test scenes, paired per scene (compare.py), greedy, sampled and best of G."""
    test = scenes.SyntheticDataset(args.task, args.test_size, seed=2, **scenes.world(args))
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
    """What a run's numbers depend on besides its seed (bit-exact on one machine only; README)."""
    on = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"cpu, ATen capability {torch.backends.cpu.get_cpu_capability()}")
    return {"torch": torch.__version__, "device": on, "threads": torch.get_num_threads(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def start_point(args):
    """--model; for GRPO the SFT warm-up's final/ (the paper's RL start); else None (the Qwen +
    VGGT pair or the tiny default). final/, not best/: the cosine ends at lr 0, and best/'s pick
    by F1@0.25 on 100 one-object validation scenes moves in steps of one scene (RESULTS.md)."""
    if args.model or args.qwen or args.stage != "grpo":
        return args.model
    safety.recover(Path(args.out) / "sft" / "final")
    return str(Path(args.out) / "sft" / "final")


def main(argv=None):
    p, given = parse(argv)
    args = finish_args(p, given)
    safety.set_threads()
    sft_final = Path(args.out) / "sft" / "final"
    safety.recover(sft_final)
    warmup = (args.stage == "grpo" and not (args.model or args.qwen)
              and not (sft_final / "config.json").exists())
    sft_args = finish_args(p, given, stage="sft") if warmup else None
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
            rank, _, device = safety.setup_distributed()
            report(args, start_point(args), rank, device)
    except (checkpoints.CheckpointError, data.DataError) as e:  # one line naming the file (and row)
        safety.fail_on(e, Path(args.out) / "init")
    rollout_vllm.close()  # --rollout vllm: its engines first, they hold groups of this process
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
