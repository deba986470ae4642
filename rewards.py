"""rewards.py: 3D-RFT's verifiable rewards, pure functions; a reward *is* the task's official
metric (VG-LLM's ScanNet detection and ScanRefer evaluators, VSI-Bench's scoring; DESIGN.md 3-4):
  1. parsing      <answer>..</answer> (or the whole text) -> JSON -> boxes / frame / answer string
  2. matching     VG-LLM's greedy per-label matching -> TP/FP/FN -> F1
  3. VSI-Bench    option-letter exact match and mean relative accuracy (MRA)
  4. rewards      total = format (0/1) + task reward, one function per task
Total: any string in, finite floats out, never an exception; text parsed with json, never eval."""
import json
import math
import re

import numpy as np

from boxes import box9, box_to_world, iou_3d, iou_prepared, prepare  # 9-DoF boxes, exact IoU

MAX_BOXES = 100  # predicted boxes considered per completion; later ones ignored (bounds the cost)
FRAME_WINDOW = 5.0  # the paper's R_frame = max(0, 1 - |f_pred - f_gt| / tau) has tau = 5 ...
FRAME_WINDOW_FRAMES = 32  # ... on 32-frame videos; "scaled" (default): tau = 5 S / 32 for S frames
FRAME_WINDOWS = ("scaled", "fixed")  # grounding_reward's frame_window: 5 S / 32, or the paper's 5
MATCH_IOU = 0.25  # VG-LLM's detection threshold (strict >)
_MRA_T = np.linspace(0.5, 0.95, 10)  # VSI-Bench: confidence thresholds 0.50, 0.55, ..., 0.95

# --------------------------------------------------------------------------------------------------
# 1. Parsing. Only str.find / str.count here: a regex with lazy groups is quadratic on adversarial
#    text.


def _strip_fence(s):
    """Content of the first ```json ... ``` fence if any (unterminated: to the end), else s."""
    s = s.strip()
    i = s.find("```")
    if i < 0:
        return s
    j = s.find("```", i + 3)
    body = s[i + 3:] if j < 0 else s[i + 3:j]
    tag = re.match(r"[A-Za-z0-9_+-]*\n", body)  # the language tag sits on the fence line: ```json\n
    if tag:
        body = body[tag.end():]
    elif body[:4].lower() == "json":
        body = body[4:]
    return body.strip()


def parse_answer(text):
    """Content of the first <answer>...</answer> block, a ```json fence removed; None if absent."""
    if not isinstance(text, str):
        return None
    i = text.find("<answer>")
    j = text.find("</answer>", i + 8) if i >= 0 else -1
    return None if j < 0 else _strip_fence(text[i + 8:j])


def answer_text(text):
    """What the task reward parses: the <answer> block, else the whole text (DESIGN.md 4)."""
    if not isinstance(text, str):
        return ""
    ans = parse_answer(text)
    return _strip_fence(text) if ans is None else ans


def load_json(s):
    # json raises ValueError on bad text, RecursionError on deep nesting, ValueError on 5000-digit
    # ints
    try:
        return json.loads(s)
    except Exception:
        return None


def _detection(e):
    """One valid detection entry {"label": str, "bbox_3d": [9 floats]}, else None."""
    if not isinstance(e, dict) or not isinstance(e.get("label"), str):
        return None
    box = box9(e.get("bbox_3d"))
    return None if box is None else {"label": e["label"], "bbox_3d": box}


def parse_detections(text, max_boxes=MAX_BOXES):
    """Valid {"label", "bbox_3d"} answer entries, at most max_boxes (bad JSON: DESIGN.md 4)."""
    s = answer_text(text)
    data = load_json(s)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        data = []
        for line in s.split("\n"):
            if "bbox_3d" in line:
                obj = load_json(line.strip().strip(","))
                data.extend(obj if isinstance(obj, list) else [obj])
                if len(data) >= max_boxes:  # enough candidates: stop scanning a huge text
                    break
    out = []
    for e in data:
        det = _detection(e)
        if det is not None:
            out.append(det)
            if len(out) >= max_boxes:
                break
    return out


def _grounding(obj):
    if not isinstance(obj, dict):
        return None
    frame, box = obj.get("frame"), box9(obj.get("bbox_3d"))
    if isinstance(frame, bool) or not isinstance(frame, int) or box is None:  # VG-LLM: an int frame
        return None
    return frame, box


def parse_grounding(text):
    """(frame: int, box: [9 floats]) from a {"frame", "bbox_3d"} JSON answer, else None."""
    s = answer_text(text)
    obj = load_json(s)
    if obj is None:
        line = next((ln for ln in s.split("\n") if "bbox_3d" in ln), "")
        obj = load_json(line.strip().strip(","))
    return _grounding(obj)


def parse_spatial(text):
    """The (stripped) answer string for a VSI-Bench question, None if empty."""
    return answer_text(text) or None


# --------------------------------------------------------------------------------------------------
# 2. Matching (VG-LLM's evaluator): per label, predictions in output order; each takes the *unused*
#    ground-truth box of its label with the highest IoU (> 0; the first on ties); a true positive
#    iff that IoU > threshold (strict), and then the box is used; otherwise a false positive.


def _match(pred, gt, thr):
    """-> ({label: [tp, fp, fn]}, best same-label IoU per prediction, IoUs of the matched pairs)."""
    gts = {}
    for g in gt:
        gts.setdefault(g["label"], []).append(prepare(g["bbox_3d"]))
    used = {label: set() for label in gts}
    counts = {label: [0, 0, 0] for label in gts}
    best, matched = [], []
    for p in pred:
        label, P = p["label"], prepare(p["bbox_3d"])
        cands = gts.get(label, [])
        ious = [iou_prepared(P, G) for G in cands]
        best.append(max(ious, default=0.0))
        j, top = -1, 0.0
        for i, v in enumerate(ious):
            if i not in used.get(label, ()) and v > top:
                j, top = i, v
        c = counts.setdefault(label, [0, 0, 0])
        if top > thr:
            used[label].add(j)
            c[0] += 1
            matched.append(top)
        else:
            c[1] += 1
    for label, boxes in gts.items():
        counts[label][2] = len(boxes) - len(used[label])
    return counts, best, matched


def match_by_label(pred, gt, iou_threshold=MATCH_IOU):
    """{label: [tp, fp, fn]} of pred / gt lists of {"label", "bbox_3d"} (the per-sample record)."""
    return _match(pred, gt, iou_threshold)[0]


def gt_iou(pred, gt, parsed=True):
    """iou_gt = sum of matched IoUs (any overlap > 0) / #gt; no gt: 1.0 iff parsed and no pred."""
    if not gt:
        return float(not pred and bool(parsed))
    return sum(_match(pred, gt, 0.0)[2]) / len(gt)


def answered_list(text, pred):
    """True iff a detection answer parsed: valid boxes (pred) or a JSON list, [] included."""
    return bool(pred) or isinstance(load_json(answer_text(text)), list)


def match_detections(pred, gt, iou_threshold=MATCH_IOU):
    """(tp, fp, fn) summed over labels."""
    counts = match_by_label(pred, gt, iou_threshold).values()
    return tuple(sum(c[i] for c in counts) for i in range(3))


def f1_score(tp, fp, fn):
    """F1 = 2TP / (2TP + FP + FN); 1 when there is neither prediction nor ground truth."""
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------------------------------
# 3. VSI-Bench scoring: the first space-separated token with trailing '.' removed. We strip the
#    answer first (VSI-Bench's split(' ') would read a leading space as an empty answer).


def _first_token(pred):
    return pred.strip().split(" ")[0].rstrip(".").strip() if isinstance(pred, str) else ""


def choice_accuracy(pred, gt_letter):
    """1.0 iff the first token equals the option letter, case-insensitive."""
    if not isinstance(gt_letter, str):
        return 0.0
    return 1.0 if _first_token(pred).lower() == gt_letter.strip().lower() else 0.0


def mra(pred, gt):
    """MRA = mean_t [|p - g| / g <= 1 - t], t in {0.50, ..., 0.95}; bad p or g, or g <= 0: 0."""
    try:
        p = float(_first_token(pred)) if isinstance(pred, str) else float(pred)
        g = float(gt)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not (math.isfinite(p) and math.isfinite(g)) or g <= 0:
        return 0.0
    return float(np.mean(abs(p - g) / g <= 1 - _MRA_T))


# --------------------------------------------------------------------------------------------------
# 4. Rewards. total = format + task reward; the task reward is 0 when nothing parses.


def _tagged(text):
    """True iff text is <think>..</think><answer>..</answer>, each tag once, whitespace allowed."""
    s = text.strip()
    if any(s.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    i, j = s.find("</think>"), s.find("<answer>")
    return s.startswith("<think>") and s.endswith("</answer>") and i < j and not s[i + 8:j].strip()


def format_reward(text, task, n_frames=None):
    """1.0 iff <think>..</think><answer>..</answer> and the answer parses (strict JSON) for task."""
    if not isinstance(text, str) or not _tagged(text):
        return 0.0
    ans = parse_answer(text)
    if task == "spatial":
        return 1.0 if ans else 0.0
    data = load_json(ans)
    if task == "detection":
        return float(isinstance(data, list) and all(_detection(e) is not None for e in data))
    parsed = _grounding(data) if task == "grounding" else None
    return float(parsed is not None and (n_frames is None or 0 <= parsed[0] < n_frames))


def detection_reward(text, gt_boxes, iou_mode="paper", f1_iou=MATCH_IOU):
    """R = format + R_IoU + R_F1 (F1 at IoU > f1_iou); iou_mode, f1_iou: DESIGN.md section 4."""
    if iou_mode not in ("paper", "robust", "gt"):
        raise ValueError(f"iou_mode must be 'paper', 'robust' or 'gt', got {iou_mode!r}")
    if not 0 <= f1_iou < 1:
        raise ValueError(f"f1_iou must be in [0, 1), got {f1_iou!r}")
    fmt, pred = format_reward(text, "detection"), parse_detections(text)
    gt = [{"label": g.get("label"), "bbox_3d": g.get("bbox_3d")} for g in (gt_boxes or [])]
    counts, best, matched = _match(pred, gt, MATCH_IOU)
    if f1_iou != MATCH_IOU:  # the F1 term at its own threshold: its own matching
        counts = _match(pred, gt, f1_iou)[0]
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    parsed = answered_list(text, pred)  # "nothing here" must be said: [] earns F1, junk does not
    f1 = f1_score(tp, fp, fn) if parsed else 0.0
    if iou_mode == "paper":
        iou = sum(best) / len(best) if best else 0.0
    elif iou_mode == "robust":
        iou = sum(matched) / max(len(pred), len(gt)) if (pred or gt) else 0.0
    else:
        iou = gt_iou(pred, gt, parsed)
    return {"total": fmt + iou + f1, "format": fmt, "iou": iou, "f1": f1,
            "n_pred": float(len(pred))}


def frame_reward(f_pred, f_gt, tau):
    """R_frame = max(0, 1 - |f_pred - f_gt| / tau) for a frame window tau (grounding_reward)."""
    return max(0.0, 1.0 - min(abs(f_pred - f_gt), 10**6) / tau)  # min(): a 10**400 frame index


def grounding_reward(text, gt_box, gt_frame, cam2global, axis_align=None, frame_window="scaled",
                     n_frames=None):
    """R = format + R_frame + R_IoU; R_IoU in the world, E = axis_align @ cam2global[f_pred].
    S = n_frames or len(cam2global); tau, poses, gt_frame None, errors: DESIGN.md section 4."""
    if frame_window not in FRAME_WINDOWS:
        raise ValueError(f"frame_window must be one of {FRAME_WINDOWS}, got {frame_window!r}")
    if cam2global is not None:
        if n_frames is not None and n_frames != len(cam2global):
            raise ValueError(f"n_frames {n_frames} != len(cam2global) {len(cam2global)}")
        n_frames = len(cam2global)
    in_video = lambda f: n_frames is None or 0 <= f < n_frames  # S unknown: not checked
    tau = None  # R_frame's window; stays None without a target frame (R_frame = 0)
    if gt_frame is not None:
        if isinstance(gt_frame, bool) or not isinstance(gt_frame, (int, np.integer)) \
                or gt_frame < 0 or not in_video(gt_frame):
            raise ValueError(f"gt_frame must be a frame index in [0, {n_frames}) or None, "
                             f"got {gt_frame!r}")
        gt_frame = int(gt_frame)
        if frame_window == "fixed":
            tau = FRAME_WINDOW
        elif n_frames is None:
            raise ValueError("frame_window='scaled' needs the video's frame count (n_frames or "
                             f"cam2global), got {n_frames!r}; or use frame_window='fixed'")
        else:
            tau = FRAME_WINDOW * n_frames / FRAME_WINDOW_FRAMES
    fmt = format_reward(text, "grounding", n_frames)
    parsed = parse_grounding(text)
    if parsed is None or not in_video(parsed[0]):
        return {"total": fmt, "format": fmt, "frame": 0.0, "iou": 0.0}
    f, box = parsed
    frame = 0.0 if tau is None else frame_reward(f, gt_frame, tau)
    iou = 0.0
    if cam2global is not None:  # (f is a frame of the video here)
        A = np.eye(4) if axis_align is None else np.asarray(axis_align, dtype=float)
        E = A @ np.asarray(cam2global[f], dtype=float)
        if np.isfinite(E).all():
            iou = iou_3d(box_to_world(box, E), gt_box)
    return {"total": fmt + frame + iou, "format": fmt, "frame": frame, "iou": iou}


def spatial_reward(text, ground_truth, options=None):
    """R = format + accuracy: exact option-letter match when there are options, else MRA."""
    fmt = format_reward(text, "spatial")
    acc = spatial_accuracy(parse_spatial(text), ground_truth, options)
    return {"total": fmt + acc, "format": fmt, "accuracy": acc}


def spatial_accuracy(ans, ground_truth, options=None, letter=choice_accuracy):
    """letter(ans, ground_truth) when there are options, else MRA; an unparsed answer (None) 0."""
    if ans is None:
        return 0.0
    return float(letter(ans, str(ground_truth)) if options else mra(ans, ground_truth))
