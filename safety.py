"""safety.py: what keeps a run from losing, mixing or silently corrupting work. Not needed to
understand 3D-RFT: train.py calls each piece in one line.

  0. the process: setup_distributed binds each torchrun rank to its GPU before the group starts
  1. stopping cleanly: every bad flag value stops with the flag, why and what to try (exit 2),
     before anything loads; a fresh run never writes into an --out that holds work; a bad data file
     or a damaged checkpoint is one line naming it (exit 1); a run of non-finite steps stops it
  2. atomic saves: every model directory and step checkpoint (save_model, save_checkpoint) is
     written to a temp directory and renamed (checksums.json by checkpoints.seal); --resume
     continues from the newest intact checkpoint (model, optimiser, every rank's RNG) and sets
     damaged ones aside as damaged-step-<k>
  3. logs: strict JSON lines (NaN/inf as null), cut back to the checkpoint on --resume;
     <stage>/data.json records what each start of a stage read; what a stage prints as it starts
     (announce), after each step (log_step) and evaluation (log_eval)
Also the CPU thread default (set_threads). Who calls it: train.py (and eval.py, section 0). It
imports substrate (checkpoints.py, data.py, scenes.py) and, for --rollout vllm's install message,
rollout_vllm.py (machinery).
"""
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

import checkpoints
import data
import rollout_vllm
import scenes


# --------------------------------------------------------------------------------------------------
# 1. Stopping cleanly: bad flags and a used --out end in one line, before anything loads
# --------------------------------------------------------------------------------------------------


def fail(message, code=2):
    """Stop with a message in the user's terms and no traceback (exit 2: the command line or --out
    is wrong). Under torchrun every rank stops; only rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def fail_on(error, init):
    """A damaged checkpoint (checkpoints.CheckpointError names the file; under init/, how to rebuild
    it) or a bad --data / --val-data file or row (data.DataError: its name and row): one line, exit
    1, no traceback."""
    hint = ""
    if isinstance(error, checkpoints.CheckpointError) and str(init) in str(error):
        hint = f" (delete {init} to rebuild it from --seed)"
    fail(f"{error}{hint}", code=1)


# flag -> (smallest valid value, why / what to try). Checked in one pass, before anything is loaded
# or written.
AT_LEAST = {
    "--steps": (1, "optimiser steps (default: sft --sft-steps, grpo 200)"),
    "--sft-steps": (1, "steps of the SFT warm-up (default 1600)"),
    "--batch-size": (1, "SFT samples per rank per step (default: 16 per step over all ranks)"),
    "--prompts-per-rank": (1, "GRPO prompts per rank per step (default: 4 per step over all "
                              "ranks)"),
    "--micro-batch": (1, "sequences per forward pass (default 16; lower it to save memory)"),
    "--frames": (1, "frames per video / scene (default 4)"),
    "--image-size": (1, "synthetic frame size in pixels (default 56)"),
    "--val-size": (1, "an empty validation set would give all-zero metrics and a meaningless "
                      "best/ (default 100)"),
    "--G": (2, "GRPO compares the G completions of a prompt with each other: one alone has no "
               "advantage (try 8)"),
    "--mu": (1, "optimiser updates per rollout (default 1)"),
    "--max-new-tokens": (1, "completion length cap (default: the task's)"),
    "--eval-every": (1, "steps between evaluations (default: steps // 5)"),
    "--save-every": (1, "steps between checkpoints (default: steps // 5)"),
    "--keep": (1, "the newest N checkpoints are kept, so --resume always has one (try 2)"),
    "--log-every": (1, "steps between sample logs (default 10)"),
    "--max-bad-steps": (1, "skipped (non-finite) steps in a row before stopping (default 5)"),
    "--train-size": (0, "0 means fresh scenes forever; N a fixed set of N scenes"),
    "--warmup": (0, "linear warm-up steps (0: none)"),
    "--workers": (0, "data-loader processes (0: load in the main process)"),
    "--lora-rank": (0, "0 means full fine-tuning"),
    "--seed": (0, "seeds are non-negative integers"),
    "--data-seed": (0, "seeds are non-negative integers"),
    "--test-size": (0, "unseen test scenes for the final start-vs-GRPO table (0: skip it)"),
    "--max-objects": (1, "objects per synthetic scene, at most (default 1)"),
}


# flag -> (test, why / what to try) for the real-valued knobs; every one must also be finite
# (argparse takes "nan").
REAL = {
    "--lr": (lambda v: v > 0, "must be > 0: 0 trains nothing and < 0 climbs the loss (try 1e-4 "
                              "for GRPO, 3e-4 for SFT; ~5e-6 for real models)"),
    "--lr-merger": (lambda v: v > 0, "must be > 0 (default: 2 x --lr)"),
    "--temperature": (lambda v: v > 0, "the sampling temperature must be > 0 (try 1.0)"),
    "--beta": (lambda v: v >= 0, "the KL weight must be >= 0 (0 turns the reference model off)"),
    "--eps-low": (lambda v: 0 <= v < 1, "must be in [0, 1): the ratio's lower clip bound "
                                        "1 - eps-low must stay > 0 (try 0.2)"),
    "--eps-high": (lambda v: v >= 0, "must be >= 0 (try 0.2; DAPO's clip-higher uses 0.28)"),
    "--max-grad-norm": (lambda v: v > 0, "the gradient clipping norm must be > 0 (try 1.0)"),
    "--f1-iou": (lambda v: 0 <= v < 1, "the F1 term's IoU threshold must be in [0, 1) (the "
                                       "paper's 0.25; 0.5 for F1@0.5)"),
}


def setup_distributed():
    """-> (rank, world size, device); torchrun's env, else one process without a group.
    train.py and eval.py start here."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:  # bind the rank to its GPU before the group starts, or every rank lands on cuda:0
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # SFT warm-up and GRPO run in one process: initialise once
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def check_args(args, p):
    """One validation pass over the command line: a bad value stops here with the flag, the value,
    why it cannot work and what to try (exit code 2, no traceback) instead of a ZeroDivisionError
    or a silently wrong run."""
    value = lambda flag: getattr(args, flag[2:].replace("-", "_"))
    for flag, (low, why) in AT_LEAST.items():
        if value(flag) < low:
            fail(f"{flag} {value(flag)}: must be >= {low}; {why}")
    for flag, (ok, why) in REAL.items():
        if not math.isfinite(value(flag)):
            fail(f"{flag} {value(flag)}: must be a finite number")
        if not ok(value(flag)):
            fail(f"{flag} {value(flag)}: {why}")
    if args.model and args.qwen:
        fail(f"--model {args.model} and --qwen {args.qwen}: give one start point (--model: our "
             "save or a VG-LLM dir; --qwen [--vggt]: a Qwen2.5-VL dir and a VGGT file)")
    if args.vggt and not args.qwen:
        fail(f"--vggt {args.vggt}: the VGGT file goes with --qwen (a VG-LLM dir given to --model "
             "has its own)")
    if args.rollout == "vllm" and args.shard == "fsdp":
        fail("--rollout vllm --shard fsdp: the engine needs the LLM's whole weights on each rank; "
             "use --shard ddp (rollout_vllm.py)")
    if args.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
        fail(rollout_vllm.INSTALL)  # now, not after the SFT warm-up at the first rollout
    files = lambda flag: [path for path, _ in value(flag) or []]  # --data a.json:2 b.json: pairs
    for flag, kind in (("--model", "dir"), ("--qwen", "dir"), ("--vggt", "file"),
                       ("--data", "files"), ("--val-data", "files"), ("--media-root", "dir")):
        for path in files(flag) if kind == "files" else [value(flag)]:
            if path is not None and not (Path(path).is_dir() if kind == "dir"
                                         else Path(path).is_file()):
                fail(f"{flag} {path}: no such {'directory' if kind == 'dir' else 'file'}")
    for flag in ("--model", "--qwen"):
        if value(flag) is not None and not (Path(value(flag)) / "config.json").is_file():
            fail(f"{flag} {value(flag)}: no config.json in it (expected a model directory: our "
                 "save, a VG-LLM or Qwen2.5-VL checkpoint)")
    if args.data and not args.val_data:
        fail(f"--data {' '.join(files('--data'))}: a real-data run needs --val-data FILE as well. "
             "Validation picks best/ (and so the GRPO start); without it the run would validate "
             "on synthetic scenes. Give the split's validation file, e.g. --val-data "
             "scanrefer_val_32frames.json")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        fail(f"--out {args.out}: is a file, not a directory")


def check_out(args, warmup):
    """Before anything is written. A fresh run refuses an --out/<stage> that already holds work
    (what is there, what to do; nothing is deleted): mixing two runs there would lose both. A run
    of the tiny default refuses an --out whose init/ another --seed built. --resume needs something
    to resume."""
    built = Path(args.out) / "init" / "init.json"  # train.tiny_init's seed (the model's draw)
    if not (args.model or args.qwen) and built.is_file():
        seed = json.loads(built.read_text())["seed"]
        if seed != args.seed:
            fail(f"{built.parent} was built with --seed {seed} and this run asks for --seed "
                 f"{args.seed}: it would start from seed {seed}'s model (and any SFT warm-up "
                 f"under {args.out}), not its own. Pass another --out for a new seed, or delete "
                 f"{args.out} yourself to start over")
    stages = (["sft"] if warmup else []) + [args.stage]
    for stage in stages:
        d = Path(args.out) / stage
        held = sorted(x.name for x in d.iterdir()) if d.is_dir() else []
        if held and not args.resume:
            fail(f"{d} already holds an earlier {stage} run ({', '.join(held[:8])}"
                 f"{', ...' if len(held) > 8 else ''}). Add --resume to continue it from its "
                 f"newest intact checkpoint, or pass another --out (or delete {d} yourself to "
                 "start over)")
    own_start = args.stage == "grpo" and not (args.model or args.qwen)  # the warm-up's run too
    ours = ["sft", "grpo"] if own_start else [args.stage]
    has_run = lambda s: (Path(args.out) / s).is_dir() and any((Path(args.out) / s).iterdir())
    if args.resume and not any(has_run(s) for s in ours):
        fail(f"--resume: nothing to resume in {args.out} (no {' or '.join(ours)} run there). "
             "Check --out, or drop --resume to start a fresh run")


def count_skipped(in_a_row, skipped, step, limit):
    """Skipped steps (a non-finite loss or gradient norm) in a row, this one counted;
    --max-bad-steps of them stop the run."""
    in_a_row = in_a_row + 1 if skipped else 0
    if in_a_row >= limit:
        raise RuntimeError(f"{in_a_row} skipped steps in a row at step {step} (non-finite loss or "
                           "gradient norm): lower --lr or check the data")
    return in_a_row


def set_threads():
    """torch's CPU threads for this process, printed at start. OMP_NUM_THREADS wins when set
    (torchrun sets 1 for several processes). Otherwise one thread on a CPU: the tiny default is
    dominated by per-op overhead, and with 2 OpenMP threads and the other core busy the SFT warm-up
    fell from 0.72 s/step to 7.6 s/step (threads that wait for each other at every op).
    `python bench.py threads` measures the candidates."""
    if "OMP_NUM_THREADS" in os.environ:
        why = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    elif torch.cuda.is_available():
        return
    else:
        torch.set_num_threads(1)
        why = "the CPU default; set OMP_NUM_THREADS to use more"
    if os.environ.get("RANK", "0") == "0":
        print(f"threads: {torch.get_num_threads()} per process ({why})")


# --------------------------------------------------------------------------------------------------
# 2. Atomic saves and resume: a kill at any moment leaves a complete old or new directory
# --------------------------------------------------------------------------------------------------


def fresh_temp(path):
    """An empty temp directory next to `path` (.tmp-<name>), a leftover of a killed save removed
    first."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def replace_dir(tmp, path):
    """Move a finished temp directory to `path`. An existing `path` is first moved aside and deleted
    only after the rename, so a kill at any moment leaves a complete old or new directory
    (os.replace cannot replace a non-empty directory by another: that was 'Directory not empty');
    recover() puts the old one back."""
    recover(path)
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path):
    """with atomic_dir(path) as tmp: write into tmp (fresh_temp); on success it replaces `path`
    (replace_dir). An error or a kill on the way leaves `path` as it was."""
    tmp = fresh_temp(path)
    yield tmp
    replace_dir(tmp, path)


def recover(path):
    """A kill between replace_dir's two renames leaves the previous directory at .old-<name> and
    nothing at <name>: put it back (called before <name> is read or replaced), so best/ or final/
    is never lost."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    if old.is_dir() and not path.exists():
        try:
            os.replace(old, path)
        except FileNotFoundError:  # another rank put it back first
            pass


def step_dirs(stage_dir):
    """The step-<k> checkpoint directories, oldest first (temp and set-aside directories do not
    match)."""
    return sorted((d for d in stage_dir.glob("step-*") if d.name[5:].isdigit()),
                  key=lambda d: int(d.name[5:]))


def prune(stage_dir, keep):
    """Delete all but the newest `keep` step-<k> checkpoints (--keep)."""
    for old in step_dirs(stage_dir)[: -keep]:
        shutil.rmtree(old)


def resume_point(args, rank, stage_dir, load):
    """--resume: the newest checkpoint that loads intact -> (dir, model, tokenizer, state), or Nones
    when there is none. A damaged one (checksum, torn file, NaN weights: checkpoints.py says which
    file) is skipped with a message and, once every rank has decided, set aside as
    damaged-step-<k> so --keep never counts it."""
    found, skipped = (None, None, None, None), []
    for ckpt in reversed(step_dirs(stage_dir)):
        try:
            checkpoints.verify(ckpt)  # state.pt's checksum; the model directory: by its loader
            state = checkpoints.read_torch(ckpt / "state.pt")
            found = (ckpt, *load(str(ckpt / "model")), state)
            break
        except checkpoints.CheckpointError as e:
            skipped.append(ckpt)
            if rank == 0:
                print(f"--resume: skipping {ckpt}: {e}")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        for ckpt in skipped:
            aside = ckpt.with_name(f"damaged-{ckpt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)
            print(f"--resume: set {ckpt.name} aside as {aside} (delete it once you have looked)")
        if found[0] is None:
            print(f"--resume: no intact checkpoint in {stage_dir}: {args.stage} starts at step 0")
        else:
            print(f"--resume: continuing {args.stage} from {found[0]}")
    return found


def resume_optimizer(model, optimizer, state, args, rank):
    """--resume: AdamW's moments from state.pt. With LoRA the saved moments belong to adapters that
    were merged away: they never go onto the new ones (not bit-exact, and the run says so)."""
    if not args.lora_rank:
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    elif rank == 0:
        print("--resume with LoRA: the checkpoint holds merged weights, so the adapters and AdamW's"
              " moments start fresh (not bit-exact; full fine-tuning resumes exactly)")


def rng_states():
    """Every rank's torch RNG state (CPU, and CUDA where there is one), gathered on every rank for
    state.pt: --resume continues each rank's sampling stream (restore_rng)."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    return rngs


def restore_rng(rng):
    """Put back this rank's RNG state, one entry of rng_states()."""
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])


def full_state(model):
    """The full (unsharded) model state dict on CPU, on every rank; for plain, DDP and FSDP2."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def save_checkpoint(model, tokenizer, optimizer, step, stage_dir, args, rank, extra):
    """step-<k>/ = model/ + state.pt, written to a temp dir and renamed: a kill mid-save keeps the
    last good one. state.pt is covered by the step's checksums.json (model/ has its own); the
    newest --keep of them stay. model: the unwrapped one (train.py's; FSDP2 shards in place)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = full_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = rng_states()  # every rank's sampling stream, so resume continues all of them
    if rank == 0:
        with atomic_dir(stage_dir / f"step-{step}") as tmp:
            checkpoints.save_pretrained(model, tokenizer, tmp / "model", state_dict=model_state)
            torch.save({"optimizer": optim_state, "step": step, "rng": rngs, "extra": extra},
                       tmp / "state.pt")
            checkpoints.seal(tmp)
        prune(stage_dir, args.keep)
    if dist.is_initialized():
        dist.barrier()


def save_model(model, tokenizer, path, rank):
    """A plain model directory (LoRA merged), written to a temp dir and renamed over the old one."""
    state = full_state(model)
    if rank == 0:
        with atomic_dir(path) as tmp:
            checkpoints.save_pretrained(model, tokenizer, tmp, state_dict=state)
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# 3. Logs: strict JSON lines, cut back on resume; what a run read
# --------------------------------------------------------------------------------------------------


def json_line(record, indent=None):
    """One strict-JSON log line (or, with indent, a readable file): NaN and inf (no JSON literal
    for them) are written as null."""
    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(clean(record), allow_nan=False, indent=indent) + "\n"


def truncate_log(path, step):
    """Keep the records of a JSONL log up to `step`: a resumed run writes the later ones again, so
    they must not appear twice. A line torn by a kill is dropped; the kept ones are rewritten as
    strict JSON."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        stepped = isinstance(record, dict) and isinstance(record.get("step"), int)
        if stepped and record["step"] <= step:
            kept.append(json_line(record))
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def save_data_report(stage_dir, info, step):
    """<stage>/data.json = {"starts": [{"step", "train", "val", "mix"}, ...]}: what each start of
    this stage read (a --resume appends one), so two runs compare by their files' SHA-256s and
    counts. Warns when a resumed run reads other training files than the start before it."""
    path = stage_dir / "data.json"
    starts = json.loads(path.read_text())["starts"] if step and path.exists() else []
    shas = lambda files: [r.get("sha256") for r in files]
    if starts and shas(starts[-1]["train"]) != shas(info["train"]):
        print(f"warning: resuming at step {step} on other training data than the run started with "
              f"(see {path})")
    tmp = path.with_name(".tmp-data.json")
    tmp.write_text(json.dumps({"starts": starts + [{"step": step, **info}]}, indent=1))
    os.replace(tmp, path)


def open_logs(stage_dir, info, step):
    """Rank 0, at the start of a stage: <stage>/ made, data.json updated, metrics.jsonl and
    samples.jsonl cut back to `step` (a resumed run rewrites what came after its checkpoint) and
    opened for appending -> (metrics log, samples log)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_data_report(stage_dir, info, step)
    for name in ("metrics.jsonl", "samples.jsonl"):
        truncate_log(stage_dir / name, step)
    return open(stage_dir / "metrics.jsonl", "a"), open(stage_dir / "samples.jsonl", "a")


def announce(args, world, device, model, per_rank, data_info):
    """Rank 0, before a stage's first step: where it runs, its batch, every flag, the data."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[{args.stage}/{args.task}] {world} rank(s) on {device}, {args.shard}; "
          f"trainable {n_train:,} params")
    if args.shard == "fsdp" and not args.fsdp:
        print("  --shard fsdp outside torchrun: one process, nothing to shard; the model runs "
              "unwrapped" + (" with bf16 autocast (--bf16)" if args.bf16 else ""))
    note = None if args.data else scenes.image_size_note(model, args.image_size)
    if note:
        print("  " + note)
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


def log_step(args, out, texts, log, samples_log, bar, first, t_first, n_val):
    """Rank 0, after each step: the metrics line, the progress bar; 5 steps after the stage's
    first (at time t_first), the time it will take; every --log-every steps a few completions."""
    step = out["step"]
    log.write(json_line(out))
    log.flush()
    bar.update(1)
    bar.set_postfix({k: f"{out[k]:.3f}" for k in ("loss", "reward") if k in out})
    if step == first + 5:  # said early (tqdm's estimate then keeps it current)
        left, minutes = args.steps - first, (time.time() - t_first) / 5 * (args.steps - first) / 60
        tqdm.write(f"[{args.stage}] {left} steps: about {minutes:.0f} min at the first steps' "
                   f"pace, plus {math.ceil(left / args.eval_every)} evaluations on {n_val} scenes")
    if texts and step % args.log_every == 0:
        samples_log.write(json_line({"step": step, "completions": texts[: args.G]}))
        samples_log.flush()


def log_eval(log, step, metrics, primary):
    """Rank 0, after each evaluation: the metrics line (eval/*) and a one-line summary."""
    log.write(json_line({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}))
    log.flush()
    shown = [primary, "parse_rate", "iou_gt", "n_pred", "count_acc", "iou", "frame_acc"]
    tqdm.write(f"step {step}: eval " + ", ".join(f"{k} {metrics[k]:.3f}" for k in shown
                                                 if k in metrics))
