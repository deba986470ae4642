"""rewards.py: the verifiable rewards of 3D-RFT as pure functions (numpy, json, re, math; nothing of ours).

A reward *is* the task's evaluation metric, so everything here follows the official evaluators
(VG-LLM's ScanNet detection and ScanRefer code, VSI-Bench's scoring) and DESIGN.md sections 3-4:

  1. parsing      <answer>..</answer> (or the whole text) -> JSON -> boxes / frame / answer string
  2. boxes        9 floats [cx, cy, cz, dx, dy, dz, a, b, c], R = Rz(a) @ Rx(b) @ Ry(c) (intrinsic ZXY)
  3. 3D IoU       exact: clip one box by the 6 half-spaces of the other, volume of the convex result
  4. matching     VG-LLM's greedy per-label matching -> TP/FP/FN -> F1
  5. VSI-Bench    option-letter exact match and mean relative accuracy (MRA)
  6. rewards      total = format (0/1) + task reward, one function per task

Every reward is a total function of the model text: any string in (1 MB, nested or truncated JSON,
NaN, huge numbers, wrong types), finite floats out, never an exception. Model text is parsed with
`json`, never `eval` (the reference evaluators eval() model output: a code-execution hole).
"""
import json
import math
import re

import numpy as np

MAX_BOXES = 100       # predicted boxes considered per completion; later ones are ignored (bounds the cost)
FRAME_WINDOW = 5.0    # the paper's R_frame = max(0, 1 - |f_pred - f_gt| / tau) has tau = 5 ...
FRAME_WINDOW_FRAMES = 32  # ... on 32-frame videos; "scaled" (default) uses tau = 5 S / 32 for S frames
FRAME_WINDOWS = ("scaled", "fixed")  # grounding_reward(frame_window=...): tau = 5 S / 32, or the paper's 5
MATCH_IOU = 0.25      # VG-LLM's detection threshold (strict >)
_MRA_T = np.linspace(0.5, 0.95, 10)  # VSI-Bench: confidence thresholds 0.50, 0.55, ..., 0.95

# ----------------------------------------------------------------------------------------------------
# 1. Parsing. Only str.find / str.count here: a regex with lazy groups is quadratic on adversarial text.


def _strip_fence(s):
    """Content of the first ```json ... ``` fence if there is one (unterminated: to the end), else s."""
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
    """Content of the first <answer>...</answer> block with a ```json fence removed; None if absent."""
    if not isinstance(text, str):
        return None
    i = text.find("<answer>")
    j = text.find("</answer>", i + 8) if i >= 0 else -1
    return None if j < 0 else _strip_fence(text[i + 8:j])


def answer_text(text):
    """What the task reward parses: the <answer> block, or the whole text when there is none.
    (DESIGN 4: only the format reward demands the tags; VG-LLM checkpoints answer with a bare ```json.)"""
    if not isinstance(text, str):
        return ""
    ans = parse_answer(text)
    return _strip_fence(text) if ans is None else ans


def load_json(s):
    try:  # json raises ValueError on bad text, RecursionError on deep nesting, ValueError on 5000-digit ints
        return json.loads(s)
    except Exception:
        return None


def _number(x):
    """A finite float from a JSON number, else None (bools are ints in Python: reject them)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    try:
        v = float(x)
    except OverflowError:  # a 400-digit JSON integer
        return None
    return v if math.isfinite(v) else None


def _box9(b):
    """A list of 9 finite floats, else None."""
    if not isinstance(b, (list, tuple, np.ndarray)) or len(b) != 9:
        return None
    vals = [_number(x) for x in (b.tolist() if isinstance(b, np.ndarray) else b)]
    return None if any(v is None for v in vals) else vals


def _detection(e):
    """One valid detection entry {"label": str, "bbox_3d": [9 floats]}, else None."""
    if not isinstance(e, dict) or not isinstance(e.get("label"), str):
        return None
    box = _box9(e.get("bbox_3d"))
    return None if box is None else {"label": e["label"], "bbox_3d": box}


def parse_detections(text, max_boxes=MAX_BOXES):
    """Valid {"label", "bbox_3d"} entries of the answer (invalid ones skipped), at most max_boxes.
    When the answer is not valid JSON (e.g. truncated at max_new_tokens) fall back to VG-LLM's evaluator:
    one box per line, each line parsed on its own (trailing commas stripped), so complete lines count."""
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
    frame, box = obj.get("frame"), _box9(obj.get("bbox_3d"))
    if isinstance(frame, bool) or not isinstance(frame, int) or box is None:  # VG-LLM: frame must be an int
        return None
    return frame, box


def parse_grounding(text):
    """(frame: int, box: [9 floats]) from a {"frame", "bbox_3d"} JSON answer, else None.
    Fallback like VG-LLM's evaluator: the first line that mentions bbox_3d, parsed alone."""
    s = answer_text(text)
    obj = load_json(s)
    if obj is None:
        line = next((l for l in s.split("\n") if "bbox_3d" in l), "")
        obj = load_json(line.strip().strip(","))
    return _grounding(obj)


def parse_spatial(text):
    """The (stripped) answer string for a VSI-Bench question, None if empty."""
    return answer_text(text) or None


# ----------------------------------------------------------------------------------------------------
# 2. Boxes. Intrinsic Z-X-Y Euler angles, as EmbodiedScan/VG-LLM (pytorch3d "ZXY"): R = Rz(a) Rx(b) Ry(c).

_UNIT = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=float)  # corner i=4x+2y+z
_FACES = ((0, 1, 3, 2), (4, 5, 7, 6), (0, 4, 5, 1), (2, 6, 7, 3), (0, 2, 6, 4), (1, 3, 7, 5))  # cycles


def euler_to_matrix(a, b, c):
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rz = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cb, -sb], [0.0, sb, cb]])
    ry = np.array([[cc, 0.0, sc], [0.0, 1.0, 0.0], [-sc, 0.0, cc]])
    return rz @ rx @ ry


def matrix_to_euler(R):
    """(a, b, c) with euler_to_matrix(a, b, c) == R. Row 2 of Rz Rx Ry is [-cb sc, sb, cb cc] and
    column 1 is [-sa cb, ca cb, sb]; at gimbal lock (cb = 0) only a +- c is defined: take c = 0."""
    cb = math.hypot(R[2, 0], R[2, 2])
    b = math.atan2(R[2, 1], cb)
    if cb > 1e-9:
        return math.atan2(-R[0, 1], R[1, 1]), b, math.atan2(-R[2, 0], R[2, 2])
    return math.atan2(R[1, 0], R[0, 0]), b, 0.0


def box_corners(box):
    """[8, 3] corners: centre + R @ (size * (u - 0.5)) for the unit-cube corners u (row i = 4x+2y+z)."""
    b = np.asarray(box, dtype=float)
    return b[:3] + ((_UNIT - 0.5) * b[3:6]) @ euler_to_matrix(*b[6:9]).T


def box_to_world(box, E):
    """Move a box by the 4x4 rigid transform E (e.g. E_k = axis_align @ cam2global[k]): centre E @ [c, 1],
    rotation E[:3,:3] @ R, sizes unchanged (so E must be rigid; ScanNet's are)."""
    b, E = np.asarray(box, dtype=float), np.asarray(E, dtype=float)
    with np.errstate(all="ignore"):
        centre = E[:3, :3] @ b[:3] + E[:3, 3]
        R = E[:3, :3] @ euler_to_matrix(*b[6:9])
    return [float(v) for v in (*centre, *b[3:6], *matrix_to_euler(R))]


def box_from_world(box, E):
    """Inverse of box_to_world: a world box into the frame whose camera-to-world transform is E."""
    return box_to_world(box, np.linalg.inv(np.asarray(E, dtype=float)))


# ----------------------------------------------------------------------------------------------------
# 3. Exact 3D IoU. Work in B's own frame, where B is the axis-aligned box [-h, h]. A (a convex polyhedron,
#    a list of planar faces) is clipped by B's 6 planes one at a time (Sutherland-Hodgman on every face,
#    then the cut is closed by a new face). The volume of the convex result is the sum of the pyramids
#    from an interior point to each face. Pitch and roll are exact: no bird's-eye-view shortcut.


def _prep(box):
    """Box -> (centre, R, half sizes, volume, radius, corners), or None if degenerate / non-finite."""
    b = _box9(box)
    if b is None or min(b[3:6]) <= 0:
        return None
    vol, radius = b[3] * b[4] * b[5], 0.5 * math.hypot(*b[3:6])
    R, b = euler_to_matrix(*b[6:9]), np.array(b)
    with np.errstate(all="ignore"):
        corners = b[:3] + ((_UNIT - 0.5) * b[3:6]) @ R.T  # [8, 3]
    if not (math.isfinite(vol) and vol > 0 and math.isfinite(radius) and np.isfinite(corners).all()):
        return None  # e.g. 1e200-metre boxes, whose volume overflows
    return b[:3], R, b[3:6] / 2, vol, radius, corners


def _clip(verts, faces, k, s, h, eps):
    """Keep the part of the polyhedron (vertex list, faces as index cycles) with s * x[k] <= h.
    Sutherland-Hodgman on every face; each crossing edge gets one new vertex, shared by its two faces.
    The new vertices bound the cut, which becomes a new face. (A vertex lying on the plane needs no
    special case: its edges to the cut-off side cross the plane right next to it.)"""
    d = [s * v[k] - h for v in verts]
    inside = [x <= eps for x in d]
    out, made = [], {}
    for face in faces:
        if max(d[v] for v in face) < -eps:  # strictly inside: unchanged
            out.append(face)
            continue
        kept = []
        for p, q in zip(face, face[1:] + face[:1]):
            if inside[p]:
                kept.append(p)
            if inside[p] != inside[q]:  # the edge crosses the plane
                e = (p, q) if p < q else (q, p)
                if e not in made:
                    u, w, t = verts[e[0]], verts[e[1]], d[e[0]] / (d[e[0]] - d[e[1]])
                    made[e] = len(verts)
                    verts.append([u[0] + t * (w[0] - u[0]), u[1] + t * (w[1] - u[1]), u[2] + t * (w[2] - u[2])])
                kept.append(made[e])
        if len(kept) >= 3:
            out.append(kept)
    if len(made) >= 3:  # close the cut: its vertices in angular order around their mean
        cut, (i, j) = list(made.values()), [m for m in range(3) if m != k]
        mi, mj = sum(verts[v][i] for v in cut) / len(cut), sum(verts[v][j] for v in cut) / len(cut)
        out.append(sorted(cut, key=lambda v: math.atan2(verts[v][j] - mj, verts[v][i] - mi)))
    return out


def _volume(verts, faces):
    """Volume of a convex polyhedron: sum over faces of |N . (v0 - o)| / 6, N the Newell normal (length
    twice the face area), o an interior point (the vertex mean), so every pyramid counts positive."""
    used = {v for f in faces for v in f}
    if not used:
        return 0.0
    o = [sum(verts[v][m] for v in used) / len(used) for m in range(3)]
    vol = 0.0
    for f in faces:
        v0 = verts[f[0]]
        nx = ny = nz = 0.0
        for a, b in zip(f[1:], f[2:]):  # fan triangulation from v0: N = sum of (p - v0) x (q - v0)
            p, q = verts[a], verts[b]
            ux, uy, uz = p[0] - v0[0], p[1] - v0[1], p[2] - v0[2]
            wx, wy, wz = q[0] - v0[0], q[1] - v0[1], q[2] - v0[2]
            nx, ny, nz = nx + uy * wz - uz * wy, ny + uz * wx - ux * wz, nz + ux * wy - uy * wx
        vol += abs(nx * (v0[0] - o[0]) + ny * (v0[1] - o[1]) + nz * (v0[2] - o[2])) / 6.0
    return vol


def _intersection(A, B):
    (ca, Ra, ha, va, ra, corners_a), (cb, Rb, hb, vb, rb, corners_b) = A, B
    # 1. cheap rejections: bounding spheres apart, or a face axis of A or B separates the boxes
    if math.dist(ca, cb) >= ra + rb:
        return 0.0
    a_in_b = (corners_a - cb) @ Rb  # [8, 3] A's corners in B's frame
    b_in_a = (corners_b - ca) @ Ra
    if (a_in_b.min(0) >= hb).any() or (a_in_b.max(0) <= -hb).any():
        return 0.0
    if (b_in_a.min(0) >= ha).any() or (b_in_a.max(0) <= -ha).any():
        return 0.0
    # 2. containment: the smaller box's volume, exactly
    eps = 1e-10 * (ra + rb)
    if (np.abs(a_in_b) <= hb + eps).all():
        return va
    if (np.abs(b_in_a) <= ha + eps).all():
        return vb
    # 3. the exact clip, in plain Python floats (faster than numpy for a dozen small polygons)
    verts, faces = a_in_b.tolist(), [list(f) for f in _FACES]
    for k in range(3):
        for s in (1.0, -1.0):
            faces = _clip(verts, faces, k, s, float(hb[k]), eps)
            if not faces:
                return 0.0
    return _volume(verts, faces)


def _iou(A, B):
    if A is None or B is None:
        return 0.0
    inter = _intersection(A, B)
    union = A[3] + B[3] - inter
    iou = inter / union if union > 0 else 0.0
    return min(max(iou, 0.0), 1.0) if math.isfinite(iou) else 0.0


def iou_3d(a, b):
    """Exact IoU of two 9-DoF boxes in [0, 1]; 0.0 for degenerate, non-finite or malformed boxes."""
    return _iou(_prep(a), _prep(b))


def iou_3d_many(a, boxes):
    """IoU of one box with each of `boxes` -> [N] array (box a prepared once)."""
    A = _prep(a)
    return np.array([_iou(A, _prep(b)) for b in boxes], dtype=float)


# ----------------------------------------------------------------------------------------------------
# 4. Matching (VG-LLM's evaluator): per label, predictions in output order; each takes the *unused*
#    ground-truth box of its label with the highest IoU (> 0; the first on ties); a true positive iff
#    that IoU > threshold (strict), and then the box is used; otherwise a false positive.


def _match(pred, gt, thr):
    """-> (per-label {label: [tp, fp, fn]}, best IoU per prediction (any same-label GT), matched IoUs)."""
    gts = {}
    for g in gt:
        gts.setdefault(g["label"], []).append(_prep(g["bbox_3d"]))
    used = {label: set() for label in gts}
    counts = {label: [0, 0, 0] for label in gts}
    best, matched = [], []
    for p in pred:
        label, P = p["label"], _prep(p["bbox_3d"])
        cands = gts.get(label, [])
        ious = [_iou(P, G) for G in cands]
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
    """{label: [tp, fp, fn]} for pred / gt lists of {"label", "bbox_3d"} (the per-sample eval record)."""
    return _match(pred, gt, iou_threshold)[0]


def gt_iou(pred, gt, parsed=True):
    """Mean over ground-truth boxes of the IoU of the prediction matched to each, one to one (the same greedy
    matching at any overlap > 0; an unmatched box counts 0). Duplicates earn nothing and a missed object costs
    its whole share. A scene without ground truth: 1.0 for an answer that says "nothing" (no predictions
    and parsed, i.e. a JSON list such as []: vacuously perfect, as F1 is), 0.0 for predicted boxes or for
    an answer that did not parse (parsed=False; see answered_list)."""
    if not gt:
        return float(not pred and bool(parsed))
    return sum(_match(pred, gt, 0.0)[2]) / len(gt)


def answered_list(text, pred):
    """True iff a detection answer parsed: it has valid boxes (pred, from parse_detections) or is a JSON
    list, [] included ("nothing here" must be said: unparseable text is not an empty answer)."""
    return bool(pred) or isinstance(load_json(answer_text(text)), list)


def match_detections(pred, gt, iou_threshold=MATCH_IOU):
    """(tp, fp, fn) summed over labels."""
    counts = match_by_label(pred, gt, iou_threshold).values()
    return tuple(sum(c[i] for c in counts) for i in range(3))


def f1_score(tp, fp, fn):
    """2TP / (2TP + FP + FN); 1 when there is neither prediction nor ground truth."""
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


# ----------------------------------------------------------------------------------------------------
# 5. VSI-Bench scoring: the first space-separated token with trailing '.' removed. We strip the answer
#    first (VSI-Bench's split(' ') would read a leading space as an empty answer).


def _first_token(pred):
    return pred.strip().split(" ")[0].rstrip(".").strip() if isinstance(pred, str) else ""


def choice_accuracy(pred, gt_letter):
    """1.0 iff the first token equals the option letter, case-insensitive."""
    if not isinstance(gt_letter, str):
        return 0.0
    return 1.0 if _first_token(pred).lower() == gt_letter.strip().lower() else 0.0


def mra(pred, gt):
    """Mean relative accuracy: mean over t in {0.50, ..., 0.95} of [|p - g| / g <= 1 - t], p = float()
    of the first token. Unparseable, nan or inf -> 0; g <= 0 -> 0 (VSI-Bench ground truths are positive;
    its own code divides by zero at g = 0). The float comparison is VSI-Bench's, boundary quirks included."""
    try:
        p = float(_first_token(pred)) if isinstance(pred, str) else float(pred)
        g = float(gt)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not (math.isfinite(p) and math.isfinite(g)) or g <= 0:
        return 0.0
    return float(np.mean(abs(p - g) / g <= 1 - _MRA_T))


# ----------------------------------------------------------------------------------------------------
# 6. Rewards. total = format + task reward; the task reward is 0 when nothing parses.


def _tagged(text):
    """True iff text is <think>..</think><answer>..</answer>, whitespace around and between allowed,
    each tag exactly once (so an answer cannot hide a second answer)."""
    s = text.strip()
    if any(s.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    i, j = s.find("</think>"), s.find("<answer>")
    return s.startswith("<think>") and s.endswith("</answer>") and i < j and not s[i + 8:j].strip()


def format_reward(text, task, n_frames=None):
    """1.0 iff the text has the think/answer format and the answer parses (strict JSON) for the task:
    detection = a JSON list whose every entry is a valid box (an empty list is a valid answer);
    grounding = {"frame": int, "bbox_3d": 9 finite numbers}, the frame in [0, n_frames) when n_frames is
    given (a frame outside the video is no answer); spatial = a non-empty answer."""
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


def detection_reward(text, gt_boxes, iou_mode="paper"):
    """R = format + R_IoU + R_F1 (F1 at IoU > 0.25 with VG-LLM's matching).
    iou_mode "paper":  R_IoU = mean over predicted boxes of the best IoU with a same-label GT box
                       (0 without predictions). Dropping uncertain boxes raises it.
    iou_mode "robust": R_IoU = sum of the IoUs of the matched (true-positive) pairs of that same matching
                       / max(#pred, #gt) (0 when both are empty). One-to-one, so duplicates earn nothing,
                       and the denominator is at least #gt, so predicting fewer boxes cannot pay.
    iou_mode "gt":     R_IoU = gt_iou: the mean over ground-truth boxes of their one-to-one IoU at any overlap
                       (the quantity eval reports as iou_gt). A missed object costs its whole share whatever
                       else is predicted; extra boxes cost only through F1. On a scene without objects 1 for
                       a parsed empty answer, 0 for boxes or unparseable text (as F1).
    At most MAX_BOXES predictions are considered."""
    if iou_mode not in ("paper", "robust", "gt"):
        raise ValueError(f"iou_mode must be 'paper', 'robust' or 'gt', got {iou_mode!r}")
    fmt = format_reward(text, "detection")
    pred = parse_detections(text)
    gt = [{"label": g.get("label"), "bbox_3d": g.get("bbox_3d")} for g in (gt_boxes or [])]  # all count
    counts, best, matched = _match(pred, gt, MATCH_IOU)
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    # "Nothing here" must be said (a JSON list, [] included): unparseable text earns no F1 on an empty scene
    parsed = answered_list(text, pred)
    f1 = f1_score(tp, fp, fn) if parsed else 0.0
    if iou_mode == "paper":
        iou = sum(best) / len(best) if best else 0.0
    elif iou_mode == "robust":
        iou = sum(matched) / max(len(pred), len(gt)) if (pred or gt) else 0.0
    else:
        iou = gt_iou(pred, gt, parsed)
    return {"total": fmt + iou + f1, "format": fmt, "iou": iou, "f1": f1, "n_pred": float(len(pred))}


def frame_reward(f_pred, f_gt, n_frames=None, frame_window="scaled"):
    """R_frame = max(0, 1 - |f_pred - f_gt| / tau).
    frame_window "scaled" (default): tau = 5 S / 32 for a video of S = n_frames frames, the paper's window as
    the same share of the video (32 frames: exactly the paper's tau = 5; 4 frames: tau = 0.625, so only the
    exact frame pays); "fixed": the paper's tau = 5 whatever S (n_frames not needed).
    f_gt None (a row without a target frame, e.g. ScanRefer val) -> 0.0: no frame is right, none earns."""
    _check_frame_window(frame_window)
    if f_gt is None:
        return 0.0
    tau = _frame_tau(n_frames, frame_window)
    return max(0.0, 1.0 - min(abs(f_pred - f_gt), 10**6) / tau)  # min(): a 10**400 frame index


def _check_frame_window(frame_window):
    if frame_window not in FRAME_WINDOWS:
        raise ValueError(f"frame_window must be one of {FRAME_WINDOWS}, got {frame_window!r}")


def _frame_tau(n_frames, frame_window):
    """The frame window tau for a video of n_frames frames (None: unknown, only "fixed" can do without it)."""
    _check_frame_window(frame_window)
    if frame_window == "fixed":
        return FRAME_WINDOW
    if n_frames is None or n_frames < 1:
        raise ValueError(f"frame_window='scaled' needs the video's frame count (n_frames or cam2global), got "
                         f"{n_frames!r}; or use frame_window='fixed'")
    return FRAME_WINDOW * n_frames / FRAME_WINDOW_FRAMES


def grounding_reward(text, gt_box, gt_frame, cam2global, axis_align=None, frame_window="scaled",
                     n_frames=None):
    """R = format + R_frame + R_IoU for an integer frame f_pred of the video.
    R_frame = frame_reward: max(0, 1 - |f_pred - f_gt| / tau), tau = 5 S / 32 with frame_window "scaled"
    (the default) or the paper's 5 with "fixed". gt_frame None = the row has no target frame: R_frame = 0 for
    every answer (the "frame" part is 0.0); format and IoU are scored as usual, so the best total is 2, not 3.
    R_IoU = IoU of the predicted box, moved from camera frame f_pred to the aligned world by
    E = axis_align @ cam2global[f_pred], with the world GT box (0 without poses).
    S = n_frames, else len(cam2global) (both given: they must agree). A frame outside the video's S frames is
    not an answer: no format, frame or IoU credit. Without poses and n_frames S is unknown: the range is not
    checked and "scaled" raises a ValueError (rft3d always passes the sample's frame count). A gt_frame
    outside [0, S) is a ValueError (a data error, e.g. an old -1 "no frame" sentinel: use None)."""
    _check_frame_window(frame_window)
    if cam2global is not None:
        if n_frames is not None and n_frames != len(cam2global):
            raise ValueError(f"n_frames {n_frames} != len(cam2global) {len(cam2global)}")
        n_frames = len(cam2global)
    if gt_frame is not None:
        if isinstance(gt_frame, bool) or not isinstance(gt_frame, (int, np.integer)) or gt_frame < 0 or \
                (n_frames is not None and gt_frame >= n_frames):
            raise ValueError(f"gt_frame must be a frame index in [0, {n_frames}) or None, got {gt_frame!r}")
        gt_frame = int(gt_frame)
        _frame_tau(n_frames, frame_window)  # "scaled" without a frame count: a setup error, raise at once
    fmt = format_reward(text, "grounding", n_frames)
    parsed = parse_grounding(text)
    if parsed is None or (n_frames is not None and not 0 <= parsed[0] < n_frames):
        return {"total": fmt, "format": fmt, "frame": 0.0, "iou": 0.0}
    f, box = parsed
    frame = frame_reward(f, gt_frame, n_frames, frame_window)
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
    ans = parse_spatial(text)
    if ans is None:
        acc = 0.0
    else:
        acc = choice_accuracy(ans, str(ground_truth)) if options else mra(ans, ground_truth)
    return {"total": fmt + acc, "format": fmt, "accuracy": acc}
