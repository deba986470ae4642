"""published.py: the public evaluators' quirks and ScanRefer's proposal refinement, so that numbers
compare with the papers' tables. Not needed to understand 3D-RFT: the training rewards and the
default evaluation (--protocol ours) never use it. Who calls it: eval.evaluate, one line each for
--protocol published (record_opts: options of rft3d.py's records) and --proposals FILE (refined).
It imports only substrate (boxes.py, data.py).

  1. the published protocol: three quirks of the public evaluators, one function or constant each
  2. proposal refinement (ScanRefer "with proposals", VG-LLM-8B: 41.6 -> 57.6 Acc@0.25): each
     predicted box, moved to the world, is replaced by the detector proposal of its scene with the
     highest IoU to it
"""
import json
import math

import numpy as np

from boxes import euler_to_matrix, iou_3d, iou_3d_many, matrix_to_euler
from data import DataError

# --------------------------------------------------------------------------------------------------
# 1. The published protocol
# --------------------------------------------------------------------------------------------------
PROTOCOLS = ("ours", "published")

# VG-LLM's detection evaluator (src/lmms_eval/tasks/threedod/utils.py, threedod_process_results)
# counts every predicted line; ours (and the training reward) stops at rewards.MAX_BOXES, which
# bounds the cost of junk text.
MAX_BOXES = math.inf


def box_to_world(box, E):
    """VG-LLM's ScanRefer evaluator (src/lmms_eval/tasks/scanrefer/utils.py,
    transform_scanrefer_bbox) moves the predicted box with scipy's Rotation.from_euler("zxy") /
    as_euler("zxy"). Lowercase is *extrinsic*: rotate about the fixed z, then the fixed x, then the
    fixed y axis, so v -> Ry(c) Rx(b) Rz(a) v, the same three elementary rotations as our intrinsic
    Rz(a) Rx(b) Ry(c) in reverse order. It then hands the new angles (a', b', c') to
    EulerDepthInstance3DBoxes, which reads them as intrinsic Z-X-Y. So the world box gets
        R' = Rz(a') Rx(b') Ry(c'),  where  Ry(c') Rx(b') Rz(a') = E[:3,:3] @ Ry(c) Rx(b) Rz(a)
    instead of E[:3,:3] @ Rz(a) Rx(b) Ry(c): the two agree only in special cases (e.g. pure yaw for
    both), so a perfect answer can lose IoU. Written without scipy: Rk(t)^T = Rk(-t), hence
    Ry(c) Rx(b) Rz(a) = euler_to_matrix(-a, -b, -c)^T, and the extrinsic angles of a matrix M are
    -matrix_to_euler(M^T) (at gimbal lock the third angle is 0, as scipy's). The centre moves as
    ours does: E @ [c, 1]."""
    b, E = [float(x) for x in box], np.asarray(E, dtype=float)
    R_extrinsic = euler_to_matrix(-b[6], -b[7], -b[8]).T                  # Ry(c) Rx(b) Rz(a)
    angles = [-x for x in matrix_to_euler((E[:3, :3] @ R_extrinsic).T)]  # scipy's as_euler("zxy")
    centre = E[:3, :3] @ np.array(b[:3]) + E[:3, 3]
    return [*map(float, centre), *b[3:6], *angles]


def first_token(text):
    """VSI-Bench's answer rule (thinking-in-space, lmms_eval/tasks/vsibench/utils.py,
    fuzzy_matching): pred.split(' ')[0].rstrip('.').strip() of the raw answer, *not* stripped
    first, so a leading space gives an empty answer (score 0). Ours strips first. The raw answer is
    the <answer> block as it stands, or the whole completion when there is none (VSI-Bench's models
    answer without tags)."""
    if not isinstance(text, str):
        return ""
    i = text.find("<answer>")
    j = text.find("</answer>", i + 8) if i >= 0 else -1
    raw = text[i + 8:j] if j >= 0 else text
    return raw.split(" ")[0].rstrip(".").strip()


def letter_match(token, gt_letter):
    """VSI-Bench's multiple-choice score: the first token equals the letter (case-insensitive), with
    nothing more stripped ("A." before a newline scores 0; ours strips it)."""
    return float(token.lower() == gt_letter.lower())


def check(protocol):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


# The quirks as rft3d's record options (the records' defaults are ours).
RECORD_OPTS = {"detection": {"max_boxes": MAX_BOXES}, "grounding": {"to_world": box_to_world},
               "spatial": {"answer": first_token, "letter": letter_match}}


def record_opts(task, protocol):
    """The keyword options of task `task`'s record under `protocol`: none for ours."""
    check(protocol)
    return RECORD_OPTS.get(task, {}) if protocol == "published" else {}  # a new task: no quirks


# --------------------------------------------------------------------------------------------------
# 2. Proposal refinement (ScanRefer "with proposals"; VG-LLM reports it with Mask3D proposals)
# --------------------------------------------------------------------------------------------------


def load_proposals(path):
    """Detector proposals per scene, in the aligned world frame (the frame of ScanRefer's gt_bbox):
        {"scene0011_00": [[cx, cy, cz, dx, dy, dz, a, b, c], ...],
         "scene0015_00": [[cx, cy, cz, dx, dy, dz], ...], ...}
    9 numbers: angles intrinsic Z-X-Y; 6 numbers: axis-aligned (VG-LLM style). An entry may also be
    an object with the box in "bbox_3d" (other keys, e.g. label or score, are ignored).
    -> {scene: [9-number boxes]}; a malformed entry is an error naming the file, scene and index."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--proposals {path}: cannot read it as JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"--proposals {path}: expected an object {{scene: [boxes]}}, "
                        f"got {type(raw).__name__}")
    out = {}
    for scene, boxes in raw.items():
        if not isinstance(boxes, list):
            raise DataError(f"--proposals {path}: scene {scene!r}: expected a list of boxes")
        out[scene] = []
        for j, b in enumerate(boxes):
            b = b.get("bbox_3d") if isinstance(b, dict) else b
            ok = isinstance(b, list) and len(b) in (6, 9) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in b)
            if not ok or min(b[3:6]) <= 0:
                raise DataError(f"--proposals {path}: scene {scene!r}, box {j}: expected 6 or 9 "
                                f"finite numbers with positive sizes, got {b!r:.80}")
            out[scene].append([float(x) for x in b] + [0.0] * (9 - len(b)))
    return out


def scene_of(sample):
    """The key of a sample's scene in a proposals file: the row's scene id (data.py: the metadata's,
    else the images' folder), VSI-Bench's scene_name, else the sample id (synthetic scenes)."""
    m = sample.meta
    return str(m.get("scene_id") or m.get("scene") or m.get("scene_name") or sample.id)


def check_scenes(samples, proposals):
    """Every sample's scene has proposals, or a DataError naming the first that has none (eval.py
    checks each batch before decoding it)."""
    for scene in map(scene_of, samples):
        if scene not in proposals:
            raise DataError(f"--proposals: no proposals for scene {scene!r} (the file has "
                            f"{len(proposals)} scenes, e.g. {sorted(proposals)[:3]})")


def refined(record, sample, proposals):
    """A grounding eval record plus iou_refined and the proposal used (eval.py --proposals; its
    scene checked by check_scenes)."""
    iou, k = refine(record["box_world"], sample.world_box, proposals[scene_of(sample)])
    return {**record, "iou_refined": iou, "proposal": k}


def refine(box_world, gt_box, proposals):
    """-> (IoU with the ground truth after refinement, index of the proposal used or None). The
    proposal with the highest IoU to the predicted world box replaces it; when none overlaps it the
    prediction stays."""
    if box_world is None:
        return 0.0, None
    ious = iou_3d_many(box_world, proposals)
    if not len(ious) or ious.max() <= 0:
        return iou_3d(box_world, gt_box), None
    k = int(np.argmax(ious))   # the first on ties
    return iou_3d(proposals[k], gt_box), k
