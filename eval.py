"""eval.py: greedy decoding over an eval set and the official metrics of the three tasks.

The metrics follow the public evaluators so numbers compare with the papers:
  - ScanNet detection: VG-LLM's evaluator (TP/FP/FN summed per class over the set, per-class P/R/F1,
    averaged over fixed 8/20/31-class lists),
  - ScanRefer: Acc@0.25 / Acc@0.5 (share of samples with IoU >= threshold; failures count as 0),
  - VSI-Bench: mean score per question type, the three relative-direction types merged, overall mean.
Rates and scores are reported x100, as the papers print them; mean IoUs and mean box counts are raw.
The per-sample records come from rft3d.py (TASKS[task].record); this file only aggregates them.

--protocol ours (default) scores with the same self-consistent rules as the training rewards; --protocol published
reproduces the public evaluators' quirks (VG-LLM's ScanRefer angle conversion, VSI-Bench's unstripped first
token, every detection line counted; see rft3d.py) so numbers compare with the papers' tables.
--proposals FILE (grounding): ScanRefer "with proposal refinement": each predicted box, moved to the world, is
replaced by the detector proposal of its scene with the highest IoU to it, then scored; raw and refined
Acc@0.25/0.5 are reported side by side.
"""
import argparse
import hashlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import grpo
import rft3d
import scenes
from rewards import box_to_world, iou_3d, iou_3d_many, parse_detections, parse_grounding

# --- metrics ---

# VG-LLM's fixed ScanNet class lists (src/lmms_eval/tasks/threedod/utils.py: cate8, cate20, cate31).
# The 31-list really has "lamp" twice and the typo "towl": kept as is, so our averages compare with
# VG-LLM's numbers ("lamp" weighs double in the 31-class average, and a "towel" class never counts).
CLASS_LISTS = {
    8: ["chair", "cabinet", "table", "bin", "couch", "bed", "bathtub", "toilet"],
    20: ["chair", "pillow", "cabinet", "table", "lamp", "couch", "desk", "stand", "bed", "backpack",
         "bathtub", "ottoman", "dresser", "bin", "toilet", "refrigerator", "stove", "microwave", "monitor",
         "computer"],
    31: ["chair", "pillow", "cabinet", "table", "lamp", "couch", "desk", "stand", "bed", "backpack",
         "bathtub", "ottoman", "dresser", "bin", "toilet", "refrigerator", "stove", "microwave", "monitor",
         "computer", "window", "shelf", "curtain", "plant", "stairs", "picture", "book", "bottle", "lamp",
         "towl", "sink"],
}
DET_THRESHOLDS = ("0.25", "0.5")
REL_DIRECTION = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")


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
    """records: {"counts": {"0.25": {label: [tp, fp, fn]}, "0.5": {...}}, "n_pred", "n_gt", "iou_gt",
    "parsed"} per sample. Returns flat keys "{precision|recall|f1}@{thr}/{cate8|cate20|cate31|micro}",
    "per_class" ({thr: {label: {tp, fp, fn, precision, recall, f1}}}) and sample statistics."""
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
        # 3. averages over the fixed lists: a class absent from the set counts 0, duplicates count twice
        for n, names in CLASS_LISTS.items():
            for m in ("precision", "recall", "f1"):
                out[f"{m}@{thr}/cate{n}"] = _mean(per_class.get(name, {}).get(m, 0.0) for name in names)
        # 4. micro: all labels pooled (labels outside the lists count too)
        p, rc, f1 = precision_recall_f1(*(sum(c[i] for c in sums.values()) for i in range(3)))
        out[f"precision@{thr}/micro"], out[f"recall@{thr}/micro"], out[f"f1@{thr}/micro"] = 100 * p, 100 * rc, 100 * f1
    # 5. per-sample statistics: box counts (GRPO may learn to drop boxes), count accuracy, parse rate
    out["n_pred"] = _mean(_finite(r.get("n_pred")) for r in records)
    out["n_gt"] = _mean(_finite(r.get("n_gt")) for r in records)
    out["count_acc"] = 100 * _mean(float(r.get("n_pred") == r.get("n_gt")) for r in records)
    out["iou_gt"] = _mean(_finite(r.get("iou_gt")) for r in records)
    out["parse_rate"] = 100 * _mean(float(bool(r.get("parsed"))) for r in records)
    return out


def grounding_metrics(records):
    """records: {"iou", "frame_pred", "frame_gt", "unique", "parsed"} (+ "iou_refined", "proposal" with
    --proposals). Acc@t = share with IoU >= t (ScanRefer / VG-LLM use >=); a failed sample has IoU 0. Split by
    unique/multiple where the record says (unique is a bool; None = unknown, left out of both splits).
    With refined IoUs the same keys again with the suffix "/refined", and the share of boxes replaced.
    frame_acc = share of exact frames over the n_frame rows that have a target frame (frame_gt not None;
    ScanRefer val rows have none); absent when no row has one (0 of 0 is no accuracy, not 0%)."""
    out = {"n": len(records)}
    splits = {"": list(range(len(records))),
              "/unique": [i for i, r in enumerate(records) if r.get("unique") is True],
              "/multiple": [i for i, r in enumerate(records) if r.get("unique") is False]}
    columns = {"": "iou", "/refined": "iou_refined"} if any("iou_refined" in r for r in records) else {"": "iou"}
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
    """records: {"question_type", "score", "parsed"}. VSI-Bench: mean score per question type; the three
    object_rel_direction_{easy,medium,hard} means averaged into one "object_rel_direction" (over the
    sub-types present: VSI-Bench's own code assumes all three); overall = unweighted mean of the task
    scores present (8 on the full benchmark). All x100."""
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
# Proposal refinement (ScanRefer "with proposals"; VG-LLM reports it with Mask3D proposals)


def load_proposals(path):
    """Detector proposals per scene, in the aligned world frame (the frame of ScanRefer's gt_bbox):
        {"scene0011_00": [[cx, cy, cz, dx, dy, dz, a, b, c], ...],   9 numbers: angles intrinsic Z-X-Y
         "scene0015_00": [[cx, cy, cz, dx, dy, dz], ...], ...}        6 numbers: axis-aligned (VG-LLM style)
    An entry may also be an object with the box in "bbox_3d" (other keys, e.g. label or score, are ignored).
    -> {scene: [9-number boxes]}; a malformed entry is an error naming the file, scene and index."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise data.DataError(f"--proposals {path}: cannot read it as JSON: {e}") from e
    if not isinstance(raw, dict):
        raise data.DataError(f"--proposals {path}: expected an object {{scene: [boxes]}}, got {type(raw).__name__}")
    out = {}
    for scene, boxes in raw.items():
        if not isinstance(boxes, list):
            raise data.DataError(f"--proposals {path}: scene {scene!r}: expected a list of boxes")
        out[scene] = []
        for j, b in enumerate(boxes):
            b = b.get("bbox_3d") if isinstance(b, dict) else b
            ok = isinstance(b, list) and len(b) in (6, 9) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in b)
            if not ok or min(b[3:6]) <= 0:
                raise data.DataError(f"--proposals {path}: scene {scene!r}, box {j}: expected 6 or 9 finite numbers "
                                 f"with positive sizes, got {b!r:.80}")
            out[scene].append([float(x) for x in b] + [0.0] * (9 - len(b)))
    return out


def scene_of(sample):
    """The key of a sample's scene in a proposals file: the row's scene id (data.py: the metadata's, else the
    images' folder), VSI-Bench's scene_name, else the sample id (synthetic scenes)."""
    m = sample.meta
    return str(m.get("scene_id") or m.get("scene") or m.get("scene_name") or sample.id)


def refine(box_world, gt_box, proposals):
    """-> (IoU with the ground truth after refinement, index of the proposal used or None). The proposal with
    the highest IoU to the predicted world box replaces it; when none overlaps it the prediction stays."""
    if box_world is None:
        return 0.0, None
    ious = iou_3d_many(box_world, proposals)
    if not len(ious) or ious.max() <= 0:
        return iou_3d(box_world, gt_box), None
    k = int(np.argmax(ious))   # the first on ties
    return iou_3d(proposals[k], gt_box), k


# --------------------------------------------------------------------------------------------------
# Evaluation: greedy decoding over a dataset, sharded over ranks, per-sample records -> metrics above

METRICS = {"detection": detection_metrics, "grounding": grounding_metrics, "spatial": spatial_metrics}
PRIMARY_METRIC = {"detection": "f1@0.25/micro", "grounding": "acc@0.25", "spatial": "overall"}  # best-checkpoint choice


@torch.no_grad()
def evaluate(model, tokenizer, task_name, dataset, max_new_tokens, batch_size=16, think=True,
             synced_gpus=False, progress=False, protocol="ours", proposals=None):
    """-> {"metrics": dict, "records": list} over the whole dataset, on every rank.

    Each rank decodes a strided shard; shards are padded to equal length (the padding is dropped) so
    every rank runs the same number of generate calls, which FSDP needs (synced_gpus). protocol: "ours" or
    "published" (rft3d.py). proposals (grounding): {scene: [9-number world boxes]} from load_proposals."""
    import rft3d

    task = rft3d.TASKS[task_name]
    if proposals is not None and task_name != "grounding":
        raise ValueError("proposals refine grounding boxes only")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    shard = list(range(rank, len(dataset), world))
    n_real, per_rank = len(shard), -(-len(dataset) // world)
    shard += (shard[-1:] or [0]) * (per_rank - len(shard))  # pad with a repeat (dropped below), even if empty
    was_training = model.training
    model.eval()
    records = []
    for start in tqdm(range(0, per_rank, batch_size), desc=f"eval {task_name}", disable=not progress or rank != 0):
        idx = shard[start:start + batch_size]
        samples = [dataset[i] for i in idx]
        missing = sorted({scene_of(s) for s in samples} - set(proposals)) if proposals is not None else []
        if missing:   # before decoding anything: a wrong proposals file fails in the first batch
            raise data.DataError(f"--proposals: no proposals for scene {missing[0]!r} (the file has {len(proposals)} "
                             f"scenes, e.g. {sorted(proposals)[:3]})")
        encodings = model.encode([s.frames for s in samples])  # once per sample
        batch = model.prompt_batch(tokenizer, [task.prompt(s, think=think) for s in samples], encodings)
        completion = model.generate(batch, encodings, max_new_tokens=max_new_tokens, do_sample=False,
                                    synced_gpus=synced_gpus)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        for j, (i, s, text) in enumerate(zip(idx, samples, texts)):
            if start + j < n_real:  # not padding
                rec = {"index": i, "id": s.id, "completion": text, **task.record(s, text, protocol=protocol)}
                if proposals is not None:
                    rec["iou_refined"], rec["proposal"] = refine(rec["box_world"], s.world_box, proposals[scene_of(s)])
                records.append(rec)
    model.train(was_training)
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return {"metrics": METRICS[task_name](records), "records": records}


def print_table(task_name, metrics):
    """A readable table: the headline numbers, then per class (detection) at each IoU threshold."""
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"  {k:<32} {v:10.4f}" if isinstance(v, float) else f"  {k:<32} {v:10d}")
    cols = ("tp", "fp", "fn", "precision", "recall", "f1")
    for thr, rows in metrics.get("per_class", {}).items():
        print(f"\n  per class @ IoU {thr:<6}" + "".join(f"{c:>10}" for c in cols))
        for label, row in sorted(rows.items()):
            print(f"  {label:<22}" + "".join(f"{row[c]:10d}" if isinstance(row[c], int) else f"{row[c]:10.2f}"
                                            for c in cols))


# --------------------------------------------------------------------------------------------------
# Paired comparisons (DESIGN.md section 9): reward-independent metrics per scene, differences with standard errors

# per task: (key, name, scale): the metrics a learning claim is read from, per scene
SCENE_METRICS = {
    "detection": [("iou_gt", "IoU/GT box", 1), ("f1_25", "F1@0.25", 1), ("f1_50", "F1@0.5", 1),
                  ("count", "count acc", 1), ("boxes", "boxes/scene", 1), ("parse", "parse", 1)],
    "grounding": [("iou", "IoU", 1), ("acc25", "Acc@0.25", 100), ("acc50", "Acc@0.5", 100),
                  ("frame", "frame acc", 100), ("parse", "parse", 100)],
    "spatial": [("score", "score", 100), ("parse", "parse", 100)],
}


def per_scene(task_name, records):
    """eval records (rft3d.py's) -> {metric: array over scenes}, in record order. Detection F1 is per scene,
    2TP / (2TP + FP + FN) at each threshold; an empty scene scores 1 when the answer says "nothing" (parsed,
    no boxes) and 0 for boxes or an answer that did not parse, as iou_gt and the training reward do.
    Grounding "frame" (1 exact frame, else 0) is NaN for a row without a target frame (frame_gt None,
    ScanRefer val): undefined, not wrong, and the array stays aligned with the scenes; compare_table and
    paired() read it over the scenes where it is defined."""
    parse = np.array([float(bool(r.get("parsed"))) for r in records])
    if task_name == "detection":
        def f1(r, thr):
            tp, fp, fn = (sum(int(c[i]) for c in r["counts"][thr].values()) for i in range(3))
            return float(bool(r.get("parsed"))) if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        return {"iou_gt": np.array([_finite(r.get("iou_gt")) for r in records]),
                "f1_25": np.array([f1(r, "0.25") for r in records]), "f1_50": np.array([f1(r, "0.5") for r in records]),
                "count": np.array([float(r["n_pred"] == r["n_gt"]) for r in records]),
                "boxes": np.array([float(r["n_pred"]) for r in records]), "parse": parse}
    if task_name == "grounding":
        iou = np.array([_finite(r.get("iou")) for r in records])
        return {"iou": iou, "acc25": (iou >= 0.25).astype(float), "acc50": (iou >= 0.5).astype(float),
                "frame": np.array([math.nan if r.get("frame_gt") is None
                                   else float(r.get("frame_pred") == r["frame_gt"]) for r in records]),
                "parse": parse}
    return {"score": np.array([_finite(r.get("score")) for r in records]), "parse": parse}


def paired(a, b):
    """Paired difference of two per-scene arrays (or [seeds, scenes] arrays, averaged over seeds first):
    (mean of a - b, its standard error over scenes)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d.mean(0) if d.ndim == 2 else d
    d = d[np.isfinite(d)]  # scenes where a metric is undefined (NaN: grounding rows without a target frame)
    if not len(d):
        return float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def fmt(value, scale, sign=False):
    v = value * scale
    return (f"{v:+.3f}" if sign else f"{v:.3f}") if scale == 1 else (f"{v:+.1f}" if sign else f"{v:.1f}")


def table(header, rows):
    """Print rows of strings under a header, columns right-aligned."""
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(k) for x, k in zip(r, w))
    print(line(header) + "\n" + "  ".join("-" * k for k in w))
    for r in rows:
        print(line(r))


def compare_table(task_name, arms, base):
    """Print each arm's mean metrics over the same scenes, then each arm's paired difference to `base` with its
    standard error. arms: {name: per_scene dict, or a list of them (seeds: per-scene values averaged over seeds)}.
    Returns {arm: {metric: (difference, standard error)}}."""
    metrics = SCENE_METRICS[task_name]
    arms = {name: {k: np.stack([x[k] for x in v]) if isinstance(v, list) else v[k] for k, _, _ in metrics}
            for name, v in arms.items()}
    rows = [[name] + [fmt(np.nanmean(m[k]) if np.isfinite(m[k]).any() else math.nan, s) for k, _, s in metrics]
            for name, m in arms.items()]
    out = {}
    for name, m in arms.items():
        if name != base:
            out[name] = {k: paired(m[k], arms[base][k]) for k, _, _ in metrics}
            rows.append([f"{name} - {base}"] + [f"{fmt(out[name][k][0], s, True)} +- {fmt(out[name][k][1], s)}"
                                                for k, _, s in metrics])
    table(["arm"] + [name for _, name, _ in metrics], rows)
    return out


def claim(task_name, diff):
    """DESIGN section 9's rule for a paired difference {metric: (d, se)} of a trained arm against the best SFT
    model: real above 3 standard errors on the main reward-independent metric (the first of SCENE_METRICS), with no
    loss of more than one standard error on the guards (detection: count accuracy and F1@0.25; grounding: frame)."""
    main = SCENE_METRICS[task_name][0][0]
    d, se = diff[main]
    guards = {"detection": ("count", "f1_25"), "grounding": ("frame",), "spatial": ()}[task_name]
    lost = [k for k in guards if diff[k][0] < -diff[k][1]]
    if d > 3 * se and not lost:
        return f"better: {main} {d:+.3f} +- {se:.3f} (> 3 standard errors), no guard metric lost more than 1"
    if d < -3 * se:
        return f"worse: {main} {d:+.3f} +- {se:.3f}"
    return f"no claim: {main} {d:+.3f} +- {se:.3f}" + (f"; lost more than 1 standard error on {lost}" if lost else "")


def plot(path, panels, xlabel="step", size=(640, 300)):
    """panels: [(title, {name: (xs, ys)})] -> a PNG of line plots stacked vertically, drawn with PIL.ImageDraw
    (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw
    W, H, m = size[0], size[1], 45
    img = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(img)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for row, (title, series) in enumerate(panels):
        top = row * H
        pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        d.text((m, top + 8), title, fill="black")
        d.rectangle([m, top + m, W - m, top + H - m], outline="black")
        if not pts:
            continue
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
        sx = lambda x: m + (x - x0) / (x1 - x0) * (W - 2 * m)
        sy = lambda y: top + H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
        d.text((m, top + H - m + 5), f"{x0:g}", fill="black")
        d.text((W - m - 60, top + H - m + 5), f"{x1:g} {xlabel}", fill="black")
        d.text((3, top + H - m - 10), f"{y0:.3g}", fill="black")
        d.text((3, top + m), f"{y1:.3g}", fill="black")
        for k, (name, (xs, ys)) in enumerate(series.items()):
            c = colours[k % len(colours)]
            p = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
            if len(p) > 1:
                d.line(p, fill=c, width=2)
            for q in p if len(p) < 30 else []:
                d.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=c)
            d.text((W - m - 170, top + m + 5 + 14 * k), name, fill=c)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def viz(sample, completion):
    """Ground truth (green) and prediction (magenta) projected on the frames; a PIL image."""
    if sample.task == "detection":  # both in the first frame's camera coordinates
        return data.draw_boxes(sample.frames, sample.intrinsics, sample.cam2global, sample.boxes,
                               parse_detections(completion), box_frame=0)
    if sample.task == "grounding":  # both moved to the aligned world frame
        pred, parsed = [], parse_grounding(completion)
        if parsed is not None and 0 <= parsed[0] < len(sample.frames):
            pred = [box_to_world(parsed[1], sample.axis_align @ sample.cam2global[parsed[0]])]
        return data.draw_boxes(sample.frames, sample.intrinsics, sample.cam2global, [sample.world_box], pred,
                               box_frame="world", axis_align=sample.axis_align)
    return data.draw_boxes(sample.frames, None, None, [])  # spatial: the frames, the answer is in the JSONL


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Greedy evaluation with the official metrics (DESIGN section 4).")
    p.add_argument("--ckpt", required=True, help="model dir: our save or a VG-LLM checkpoint")
    p.add_argument("--task", choices=sorted(METRICS), default="detection", help="which task")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="VG-LLM JSON / VSI-Bench file(s), evaluated end to end (a train-style ':weight' suffix is "
                        "ignored here); default: synthetic test scenes")
    p.add_argument("--media-root", default=None, help="root of the image/video paths in --data")
    p.add_argument("--test-size", "--n", type=int, default=400, help="synthetic test scenes (seed 2: never trained "
                   "on); --n is its old name, which torchrun's own parser refuses as ambiguous")
    p.add_argument("--frames", type=int, default=4, help="frames per video / scene")
    p.add_argument("--image-size", type=int, default=56, help="synthetic frame size")
    p.add_argument("--pitch", type=float, default=0.0, help="synthetic: camera pitch in degrees (as in training)")
    p.add_argument("--max-objects", type=int, default=1, help="synthetic: objects per scene, at most (as in training)")
    p.add_argument("--spelling", choices=["canonical", "random"], default="canonical", help="synthetic: box spellings")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--no-think", action="store_true", help="prompt without the think/answer instruction (VG-LLM checkpoints)")
    p.add_argument("--out", default=None, help="where predictions.jsonl / metrics.json go (default: <ckpt>/eval-<task>)")
    p.add_argument("--viz", type=int, default=0, help="write PNGs of predicted vs ground-truth boxes for N samples")
    p.add_argument("--bf16", action="store_true", help="load in bf16 (GPU)")
    p.add_argument("--protocol", choices=["ours", "published"], default="ours",
                   help="ours: self-consistent, the training rewards' rules (the README's tables); published: the "
                        "public evaluators' quirks, to compare with the papers' tables (rft3d.py)")
    p.add_argument("--proposals", default=None, metavar="FILE",
                   help="grounding: JSON {scene: [[cx,cy,cz,dx,dy,dz(,a,b,c)], ...]} of detector boxes in the aligned "
                        "world; each prediction is replaced by the proposal with the highest IoU to it (raw and "
                        "refined Acc@0.25/0.5 side by side)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows of --data (listed with reasons)")
    args = p.parse_args(argv)
    for name in ("test_size", "frames", "image_size", "batch_size", "max_new_tokens"):  # explicit 0s are errors, not defaults
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not (Path(args.ckpt) / "config.json").is_file():
        p.error(f"--ckpt {args.ckpt}: no config.json there (expected a model directory: our save or a VG-LLM one)")
    if args.proposals and args.task != "grounding":
        p.error("--proposals refines grounding boxes: use it with --task grounding")
    try:
        args.files = [path for path, _ in data.parse_files(args.data or [])]
    except ValueError as e:
        p.error(f"--data {e}")
    return args


def main(argv=None):
    args = get_args(argv)
    rank, _, device = grpo.setup_distributed()  # each rank bound to its own GPU, as in train.py
    try:
        run(args, rank, device)
    except (data.DataError, checkpoints.CheckpointError) as e:  # a bad file or row: named, one line, no traceback
        raise SystemExit(f"eval.py: error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, device):
    # 1. What is read (data files, proposals), checked before the model loads; printed and stored in metrics.json
    if args.data:
        dataset, reports = data.load_files(args.task, args.files, media_root=args.media_root, frames=args.frames,
                                           skip_bad=args.skip_bad)
    else:
        world = dict(frames=args.frames, size=args.image_size, pitch=args.pitch, max_objects=args.max_objects,
                     spelling=args.spelling)
        dataset = scenes.SyntheticDataset(args.task, args.test_size, seed=2, **world)
        reports = [{"source": "synthetic test scenes", "task": args.task, "seed": 2, "n": args.test_size, **world}]
    proposals, info = None, {"protocol": args.protocol, "data": reports}
    if args.proposals:
        proposals = load_proposals(args.proposals)
        with open(args.proposals, "rb") as f:
            info["proposals"] = {"path": os.path.abspath(args.proposals), "sha256": hashlib.sha256(f.read()).hexdigest(),
                                 "scenes": len(proposals), "boxes": sum(map(len, proposals.values()))}
    if rank == 0:
        for r in reports:
            print(data.describe(r))
        print(f"protocol: {args.protocol}" + (f"; proposals: {json.dumps(info['proposals'])}" if proposals else ""))
    # 2. The model, greedy decoding, the metrics
    dtype = torch.bfloat16 if args.bf16 else None
    cfg = checkpoints.read_json(Path(args.ckpt) / "config.json")
    load = checkpoints.from_vgllm if "use_vggt_feature" in cfg else checkpoints.load_pretrained
    net, tok = load(args.ckpt, dtype)
    net.to(device)
    if not args.data and rank == 0 and net.config["image_width"] != args.image_size:
        print(f"--image-size {args.image_size}: this model resizes every frame to {net.config['image_width']} px wide "
              "(its config's image_width)")
    out = evaluate(net, tok, args.task, dataset, args.max_new_tokens or rft3d.MAX_NEW_TOKENS[args.task],
                   args.batch_size, think=not args.no_think, progress=True, protocol=args.protocol,
                   proposals=proposals)
    if rank == 0:
        out_dir = Path(args.out or Path(args.ckpt) / f"eval-{args.task}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "predictions.jsonl", "w") as f:
            for r in out["records"]:
                f.write(json.dumps(r) + "\n")
        (out_dir / "metrics.json").write_text(json.dumps({**out["metrics"], **info}, indent=1))
        print(f"{args.task}: {len(out['records'])} samples from {' '.join(args.data or ['synthetic test scenes'])}, "
              f"protocol {args.protocol}")
        print_table(args.task, out["metrics"])
        if proposals is not None:
            m = out["metrics"]
            print(f"\n  {'':<12}{'raw':>10}{'refined':>10}   (proposals: {args.proposals}, "
                  f"{m['replaced_rate']:.1f}% of boxes replaced)")
            for t in ("0.25", "0.5"):
                print(f"  {'Acc@' + t:<12}{m['acc@' + t]:10.2f}{m['acc@' + t + '/refined']:10.2f}")
        for r in out["records"][: args.viz]:
            viz(dataset[r["index"]], r["completion"]).save(out_dir / f"viz-{r['index']:05d}.png")
        print(f"wrote {out_dir}/predictions.jsonl, metrics.json" + (f" and {args.viz} PNGs" if args.viz else ""))


if __name__ == "__main__":
    main()
