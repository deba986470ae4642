"""eval.py: decoding over an eval set (greedy; or n samples per scene) and the official metrics.

  1. metrics: detection_metrics, grounding_metrics, spatial_metrics (per-sample records -> numbers)
  2. evaluate(): greedy (or sampled) decoding over a dataset, sharded over ranks -> records, metrics
  3. the command line, `python eval.py --ckpt DIR --task T`: get_args, main, run, print_table, viz

The metrics follow the public evaluators so numbers compare with the papers (DESIGN.md section 4):
ScanNet detection as VG-LLM's evaluator (TP/FP/FN summed per class over the set, P/R/F1 per class,
averaged over its 8/20/31-class lists), ScanRefer Acc@0.25 / 0.5, VSI-Bench's mean per question
type. Rates and scores x100, as the papers print them; mean IoUs and box counts raw. Per-sample
records come from rft3d.py; --protocol published (the public evaluators' quirks) and --proposals
(ScanRefer's proposal refinement) are published.py's; paired comparisons of models, compare.py's.
"""
import argparse
import hashlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import rft3d
import safety  # setup_distributed (machinery)
import scenes
import published  # the public evaluators' quirks and ScanRefer proposal refinement (machinery)
from boxes import box_to_world
from rewards import parse_detections, parse_grounding

# --------------------------------------------------------------------------------------------------
# 1. Metrics: per-sample records -> the numbers the papers print
# --------------------------------------------------------------------------------------------------

# VG-LLM's fixed ScanNet class lists (src/lmms_eval/tasks/threedod/utils.py: cate8, cate20, cate31).
# The 31-list really has "lamp" twice and the typo "towl": kept as is, so our averages compare with
# VG-LLM's numbers ("lamp" weighs double in the 31-class average, and a "towel" class never counts).
CLASS_LISTS = {
    8: ["chair", "cabinet", "table", "bin", "couch", "bed", "bathtub", "toilet"],
    20: ["chair", "pillow", "cabinet", "table", "lamp", "couch", "desk", "stand", "bed", "backpack",
         "bathtub", "ottoman", "dresser", "bin", "toilet", "refrigerator", "stove", "microwave",
         "monitor", "computer"],
    31: ["chair", "pillow", "cabinet", "table", "lamp", "couch", "desk", "stand", "bed", "backpack",
         "bathtub", "ottoman", "dresser", "bin", "toilet", "refrigerator", "stove", "microwave",
         "monitor", "computer", "window", "shelf", "curtain", "plant", "stairs", "picture", "book",
         "bottle", "lamp", "towl", "sink"],
}
DET_THRESHOLDS = ("0.25", "0.5")
REL_DIRECTION = ("object_rel_direction_easy", "object_rel_direction_medium",
                 "object_rel_direction_hard")


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _finite(x):
    """A failed sample's value (None, nan, missing) counts as 0."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else 0.0


def precision_recall_f1(tp, fp, fn):
    """P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R); 0 on an empty denominator (VG-LLM)."""
    p = tp / (tp + fp) if tp + fp > 0 else 0.0
    r = tp / (tp + fn) if tp + fn > 0 else 0.0
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def detection_metrics(records):
    """records: {"counts": {"0.25": {label: [tp, fp, fn]}, "0.5": {...}}, "n_pred", "n_gt",
    "iou_gt", "parsed"} per sample. Returns flat keys
    "{precision|recall|f1}@{thr}/{cate8|cate20|cate31|micro}", "per_class"
    ({thr: {label: {tp, fp, fn, precision, recall, f1}}}) and sample statistics."""
    out = {"n": len(records), "per_class": {}}
    for thr in DET_THRESHOLDS:
        # 1. TP/FP/FN summed per class over the whole set (not averaged per sample)
        sums = defaultdict(lambda: [0, 0, 0])
        for r in records:
            for label, c in r.get("counts", {}).get(thr, {}).items():
                for i in range(3):
                    sums[label][i] += int(c[i])
        # 2. per-class P/R/F1
        per_class = {}
        for label, (tp, fp, fn) in sorted(sums.items()):
            p, rc, f1 = precision_recall_f1(tp, fp, fn)
            per_class[label] = {"tp": tp, "fp": fp, "fn": fn,
                                "precision": 100 * p, "recall": 100 * rc, "f1": 100 * f1}
        out["per_class"][thr] = per_class
        # 3. averages over the fixed lists: a class absent from the set counts 0, duplicates twice
        for n, names in CLASS_LISTS.items():
            for m in ("precision", "recall", "f1"):
                out[f"{m}@{thr}/cate{n}"] = _mean(per_class.get(name, {}).get(m, 0.0)
                                                  for name in names)
        # 4. micro: all labels pooled (labels outside the lists count too)
        p, rc, f1 = precision_recall_f1(*(sum(c[i] for c in sums.values()) for i in range(3)))
        out[f"precision@{thr}/micro"], out[f"recall@{thr}/micro"], out[f"f1@{thr}/micro"] = (
            100 * p, 100 * rc, 100 * f1)
    # 5. per-sample statistics: box counts (GRPO may learn to drop boxes), count accuracy,
    #    parse rate
    out["n_pred"] = _mean(_finite(r.get("n_pred")) for r in records)
    out["n_gt"] = _mean(_finite(r.get("n_gt")) for r in records)
    # an answer that did not parse names no count, not "zero boxes" (right on an empty scene)
    out["count_acc"] = 100 * _mean(float(bool(r.get("parsed")) and r.get("n_pred") == r.get("n_gt"))
                                   for r in records)
    out["iou_gt"] = _mean(_finite(r.get("iou_gt")) for r in records)
    out["parse_rate"] = 100 * _mean(float(bool(r.get("parsed"))) for r in records)
    return out


def grounding_metrics(records):
    """records: {"iou", "frame_pred", "frame_gt", "unique", "parsed"} (+ "iou_refined", "proposal"
    with --proposals). Acc@t = share with IoU >= t (ScanRefer / VG-LLM use >=); a failed sample
    has IoU 0. Split by unique/multiple where the record says (unique is a bool; None = unknown,
    left out of both splits). With refined IoUs the same keys again with the suffix "/refined",
    and the share of boxes replaced. frame_acc = share of exact frames over the n_frame rows that
    have a target frame (frame_gt not None; ScanRefer val rows have none); absent when no row has
    one (0 of 0 is no accuracy, not 0%)."""
    out = {"n": len(records)}
    splits = {"": list(range(len(records))),
              "/unique": [i for i, r in enumerate(records) if r.get("unique") is True],
              "/multiple": [i for i, r in enumerate(records) if r.get("unique") is False]}
    columns = ({"": "iou", "/refined": "iou_refined"} if any("iou_refined" in r for r in records)
               else {"": "iou"})
    for suffix, key in columns.items():
        ious = [_finite(r.get(key)) for r in records]
        out["iou" + suffix] = _mean(ious)
        for name, idx in splits.items():
            if name and not idx:
                continue
            for t in (0.25, 0.5):
                out[f"acc@{t}{name}{suffix}"] = 100 * _mean(float(ious[i] >= t) for i in idx)
            if name and not suffix:
                out[f"n{name}"] = len(idx)
    if len(columns) > 1:
        out["replaced_rate"] = 100 * _mean(float(r.get("proposal") is not None) for r in records)
    framed = [r for r in records if r.get("frame_gt") is not None]
    out["n_frame"] = len(framed)
    if framed:
        out["frame_acc"] = 100 * _mean(float(r.get("frame_pred") == r["frame_gt"]) for r in framed)
    out["parse_rate"] = 100 * _mean(float(bool(r.get("parsed"))) for r in records)
    return out


def spatial_metrics(records):
    """records: {"question_type", "score", "parsed"}. VSI-Bench: mean score per question type; the
    three object_rel_direction_{easy,medium,hard} means averaged into one "object_rel_direction"
    (over the sub-types present: VSI-Bench's own code assumes all three); overall = unweighted mean
    of the task scores present (8 on the full benchmark). All x100."""
    by_type = defaultdict(list)
    for r in records:
        by_type[str(r.get("question_type"))].append(_finite(r.get("score")))
    scores = {qt: 100 * _mean(v) for qt, v in by_type.items()}
    rel = [scores.pop(qt) for qt in REL_DIRECTION if qt in scores]
    if rel:
        scores["object_rel_direction"] = _mean(rel)
    out = dict(sorted(scores.items()))
    out["overall"] = _mean(scores.values())
    out["parse_rate"] = 100 * _mean(float(bool(r.get("parsed"))) for r in records)
    out["n"] = len(records)
    return out


# --------------------------------------------------------------------------------------------------
# 2. evaluate(): greedy decoding over a dataset, sharded over ranks, per-sample records -> metrics
# --------------------------------------------------------------------------------------------------

METRICS = {"detection": detection_metrics, "grounding": grounding_metrics,
           "spatial": spatial_metrics}
# the metric that picks the best checkpoint
PRIMARY_METRIC = {"detection": "f1@0.25/micro", "grounding": "acc@0.25", "spatial": "overall"}


@torch.no_grad()
def evaluate(model, tokenizer, task_name, dataset, max_new_tokens, batch_size=16, think=True,
             synced_gpus=False, progress=False, protocol="ours", proposals=None, samples=0,
             temperature=1.0):
    """-> {"metrics": dict, "records": list} over the whole dataset, on every rank.

    Greedy by default. samples = n > 0: n completions per scene sampled at `temperature` (the
    policy GRPO optimises, not its mode), records ordered by (index, sample); the metrics are then
    over all samples, and compare.sampled gives the mean and best of n per scene.
    Each rank decodes a strided shard; shards are padded to equal length (the padding is dropped) so
    every rank runs the same number of generate calls, which FSDP needs (synced_gpus). protocol:
    "ours" or "published"; proposals (grounding): from published.load_proposals."""
    if proposals is not None and task_name != "grounding":
        raise ValueError("proposals refine grounding boxes only")
    task, opts = rft3d.TASKS[task_name], published.record_opts(task_name, protocol)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    shard = list(range(rank, len(dataset), world))
    n_real, per_rank = len(shard), -(-len(dataset) // world)
    # pad with a repeat (dropped below), even if empty
    shard += (shard[-1:] or [0]) * (per_rank - len(shard))
    was_training = model.training
    model.eval()
    records, reps = [], max(samples, 1)
    step = max(batch_size // reps, 1)  # scenes per generate call: batch_size rows in all
    for start in tqdm(range(0, per_rank, step), desc=f"eval {task_name}",
                      disable=not progress or rank != 0):
        idx = shard[start:start + step]
        items = [dataset[i] for i in idx]
        if proposals is not None:  # before decoding: a wrong proposals file fails at once
            published.check_scenes(items, proposals)
        encodings = model.encode([s.frames for s in items])  # once per scene
        enc = [e for e in encodings for _ in range(reps)]  # a scene's n rows share one prefill
        prompts = [task.prompt(s, think=think) for s in items for _ in range(reps)]
        completion = model.generate(model.prompt_batch(tokenizer, prompts, enc), enc,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    do_sample=samples > 0, synced_gpus=synced_gpus)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        for row, text in enumerate(texts):
            j = row // reps
            i, s = idx[j], items[j]
            if start + j < n_real:  # not padding
                rec = {"index": i, "id": s.id, "completion": text,
                       **({"sample": row % reps} if samples else {}),
                       **task.record(s, text, **opts)}
                records.append(rec if proposals is None else published.refined(rec, s, proposals))
    model.train(was_training)
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part),
                         key=lambda r: (r["index"], r.get("sample", 0)))
    return {"metrics": METRICS[task_name](records), "records": records}


# --------------------------------------------------------------------------------------------------
# 3. The command line: arguments, the run, its table and pictures
# --------------------------------------------------------------------------------------------------


def print_table(task_name, metrics):
    """A readable table: the headline numbers, then per class (detection) at each IoU threshold."""
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"  {k:<32} {v:10.4f}" if isinstance(v, float) else f"  {k:<32} {v:10d}")
    cols = ("tp", "fp", "fn", "precision", "recall", "f1")
    for thr, rows in metrics.get("per_class", {}).items():
        print(f"\n  per class @ IoU {thr:<6}" + "".join(f"{c:>10}" for c in cols))
        for label, row in sorted(rows.items()):
            print(f"  {label:<22}" + "".join(f"{row[c]:10d}" if isinstance(row[c], int)
                                            else f"{row[c]:10.2f}" for c in cols))


def viz(sample, completion):
    """Ground truth (green) and prediction (magenta) projected on the frames; a PIL image."""
    if sample.task == "detection":  # both in the first frame's camera coordinates
        return data.draw_boxes(sample.frames, sample.intrinsics, sample.cam2global, sample.boxes,
                               parse_detections(completion), box_frame=0)
    if sample.task == "grounding":  # both moved to the aligned world frame
        pred, parsed = [], parse_grounding(completion)
        if parsed is not None and 0 <= parsed[0] < len(sample.frames):
            pred = [box_to_world(parsed[1], sample.axis_align @ sample.cam2global[parsed[0]])]
        return data.draw_boxes(sample.frames, sample.intrinsics, sample.cam2global,
                               [sample.world_box], pred, box_frame="world",
                               axis_align=sample.axis_align)
    # spatial: the frames, the answer is in the JSONL
    return data.draw_boxes(sample.frames, None, None, [])


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="Greedy (or, with --samples, sampled) evaluation with the official metrics "
                    "(DESIGN.md section 4).")
    p.add_argument("--ckpt", required=True, help="model dir: our save or a VG-LLM checkpoint")
    p.add_argument("--task", choices=sorted(METRICS), default="detection", help="which task")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="VG-LLM JSON / VSI-Bench file(s), evaluated end to end (a train-style "
                        "':weight' suffix is ignored here); default: synthetic test scenes")
    p.add_argument("--media-root", default=None, help="root of the image/video paths in --data")
    p.add_argument("--test-size", "--n", type=int, default=400,
                   help="synthetic test scenes (seed 2: never trained on); --n is its old name, "
                        "which torchrun's own parser refuses as ambiguous")
    p.add_argument("--frames", type=int, default=4, help="frames per video / scene")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    p.add_argument("--samples", type=int, default=0, help="0: greedy; n: n samples per scene at "
                   "--temperature (the policy GRPO optimises), metrics over all of them and "
                   "predictions.jsonl with a 'sample' field")
    p.add_argument("--temperature", type=float, default=1.0, help="with --samples (training's T)")
    p.add_argument("--seed", type=int, default=0,
                   help="with --samples: rank r samples with seed + r")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--no-think", action="store_true",
                   help="prompt without the think/answer instruction (VG-LLM checkpoints)")
    p.add_argument("--out", default=None,
                   help="where predictions.jsonl / metrics.json go (default: <ckpt>/eval-<task>)")
    p.add_argument("--viz", type=int, default=0,
                   help="write PNGs of predicted vs ground-truth boxes for N samples")
    p.add_argument("--bf16", action="store_true", help="load in bf16 (GPU)")
    p.add_argument("--protocol", choices=["ours", "published"], default="ours",
                   help="ours: self-consistent, the training rewards' rules (the README's "
                        "tables); published: the public evaluators' quirks, to compare with the "
                        "papers' tables (rft3d.py)")
    p.add_argument("--proposals", default=None, metavar="FILE",
                   help="grounding: JSON {scene: [[cx,cy,cz,dx,dy,dz(,a,b,c)], ...]} of detector "
                        "boxes in the aligned world; each prediction is replaced by the proposal "
                        "with the highest IoU to it (raw and refined Acc@0.25/0.5 side by side)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad rows of --data (listed with reasons)")
    scenes.add_world_args(p)
    args = p.parse_args(argv)
    # explicit 0s are errors, not defaults
    for name in ("test_size", "frames", "image_size", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: seeds are non-negative integers")
    if args.samples < 0 or not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--samples {args.samples} --temperature {args.temperature}: samples >= 0 and a "
                "finite temperature > 0")
    if not (Path(args.ckpt) / "config.json").is_file():
        p.error(f"--ckpt {args.ckpt}: no config.json there (expected a model directory: our save "
                "or a VG-LLM one)")
    if args.proposals and args.task != "grounding":
        p.error("--proposals refines grounding boxes: use it with --task grounding")
    try:
        args.files = [path for path, _ in data.parse_files(args.data or [])]
    except ValueError as e:
        p.error(f"--data {e}")
    return args


def main(argv=None):
    args = get_args(argv)
    rank, _, device = safety.setup_distributed()  # each rank bound to its own GPU, as in train.py
    try:
        run(args, rank, device)
    except (data.DataError, checkpoints.CheckpointError) as e:
        # a bad file or row: named, one line, no traceback
        raise SystemExit(f"eval.py: error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, device):
    # 1. What is read (data files, proposals), checked before the model loads; printed and stored
    #    in metrics.json
    if args.data:
        dataset, reports = data.load_files(args.task, args.files, media_root=args.media_root,
                                           frames=args.frames, skip_bad=args.skip_bad)
    else:
        world = scenes.world(args)
        dataset = scenes.SyntheticDataset(args.task, args.test_size, seed=2, **world)
        reports = [{"source": "synthetic test scenes", "task": args.task, "seed": 2,
                    "n": args.test_size, **world}]
    proposals, info = None, {"protocol": args.protocol, "data": reports}
    if args.proposals:
        proposals = published.load_proposals(args.proposals)
        with open(args.proposals, "rb") as f:
            info["proposals"] = {"path": os.path.abspath(args.proposals),
                                 "sha256": hashlib.sha256(f.read()).hexdigest(),
                                 "scenes": len(proposals),
                                 "boxes": sum(map(len, proposals.values()))}
    if rank == 0:
        for r in reports:
            print(data.describe(r))
        print(f"protocol: {args.protocol}"
              + (f"; proposals: {json.dumps(info['proposals'])}" if proposals else ""))
    # 2. The model, greedy decoding, the metrics
    net, tok = checkpoints.load(args.ckpt, torch.bfloat16 if args.bf16 else None)
    net.to(device)
    note = None if args.data else scenes.image_size_note(net, args.image_size)
    if note and rank == 0:
        print(note)
    torch.manual_seed(args.seed + rank)  # --samples: each rank its own stream, the same every run
    out = evaluate(net, tok, args.task, dataset,
                   args.max_new_tokens or rft3d.MAX_NEW_TOKENS[args.task], args.batch_size,
                   think=not args.no_think, progress=True, protocol=args.protocol,
                   proposals=proposals, samples=args.samples, temperature=args.temperature)
    if rank == 0:
        out_dir = Path(args.out or Path(args.ckpt) / f"eval-{args.task}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "predictions.jsonl", "w") as f:
            for r in out["records"]:
                f.write(json.dumps(r) + "\n")
        (out_dir / "metrics.json").write_text(json.dumps({**out["metrics"], **info}, indent=1))
        print(f"{args.task}: {len(out['records'])} samples from "
              f"{' '.join(args.data or ['synthetic test scenes'])}, protocol {args.protocol}")
        print_table(args.task, out["metrics"])
        if proposals is not None:
            m = out["metrics"]
            print(f"\n  {'':<12}{'raw':>10}{'refined':>10}   (proposals: {args.proposals}, "
                  f"{m['replaced_rate']:.1f}% of boxes replaced)")
            for t in ("0.25", "0.5"):
                print(f"  {'Acc@' + t:<12}{m['acc@' + t]:10.2f}{m['acc@' + t + '/refined']:10.2f}")
        for r in out["records"][: args.viz]:  # with --samples: one PNG per sample
            name = f"viz-{r['index']:05d}" + (f"-{r['sample']}" if "sample" in r else "")
            viz(dataset[r["index"]], r["completion"]).save(out_dir / f"{name}.png")
        print(f"wrote {out_dir}/predictions.jsonl, metrics.json"
              + (f" and {args.viz} PNGs" if args.viz else ""))


if __name__ == "__main__":
    main()
