"""rewards.py: rewards against independently derived numbers, parsing rules, totality."""
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boxes as B
import rewards
import rewards as R
from test_boxes import PI, random_box, random_rigid, rodrigues


# ---- matching, F1, detection reward --------------------------------------------------------------

def det(label, x, size=1.0):
    return {"label": label, "bbox_3d": [x, 0, 0, size, size, size, 0, 0, 0]}


def test_matching_is_greedy_in_output_order():
    # unit cubes along x: IoU = o / (2 - o) with overlap o = 1 - |dx|
    g1, g2 = det("chair", 0.0), det("chair", 0.6)
    p1 = det("chair", 0.25)   # g1: o=.75 -> .6;  g2: o=.65 -> .481
    p2 = det("chair", -0.1)   # g1: o=.9 -> .818; g2: o=.3 -> .176 (below .25)
    assert R.match_detections([p1, p2], [g1, g2]) == (1, 1, 1)  # p1 takes g1, p2 is left with g2
    assert R.match_detections([p2, p1], [g1, g2]) == (2, 0, 0)  # p2 takes g1, p1 takes g2
    assert R.match_by_label([p1, p2], [g1, g2]) == {"chair": [1, 1, 1]}
    # labels never mix
    assert R.match_detections([det("table", 0.0)], [g1]) == (0, 1, 1)
    assert R.match_by_label([det("table", 0.0)], [g1]) == {"chair": [0, 0, 1], "table": [0, 1, 0]}


def test_matching_threshold_is_strict():
    big = {"label": "bin", "bbox_3d": [0, 0, 0, 2, 2, 2, 0, 0, 0]}
    quarter = {"label": "bin", "bbox_3d": [0, 0.5, 0.5, 2, 1, 1, 0, 0, 0]}  # inside, volume 2 of 8
    assert B.iou_3d(big["bbox_3d"], quarter["bbox_3d"]) == 0.25
    assert R.match_detections([quarter], [big]) == (0, 1, 1)
    assert R.match_detections([quarter], [big], iou_threshold=0.2499) == (1, 0, 0)


def test_f1():
    assert R.f1_score(0, 0, 0) == 1.0
    assert R.f1_score(0, 0, 2) == 0.0 and R.f1_score(0, 3, 0) == 0.0
    assert R.f1_score(1, 1, 1) == 0.5 and R.f1_score(3, 1, 2) == 6 / 9


def tagged(answer, think="look"):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


GT = [det("chair", 0.0), det("chair", 3.0), det("table", 6.0)]


def test_detection_reward_perfect_and_partial():
    r = R.detection_reward(tagged(json.dumps(GT)), GT)
    assert r == pytest.approx({"total": 3.0, "format": 1.0, "iou": 1.0, "f1": 1.0, "n_pred": 3.0})
    one = [GT[0]]  # one exact box out of three
    paper = R.detection_reward(tagged(json.dumps(one)), GT)
    robust = R.detection_reward(tagged(json.dumps(one)), GT, iou_mode="robust")
    assert paper["iou"] == pytest.approx(1.0) and robust["iou"] == pytest.approx(1 / 3)
    assert paper["f1"] == pytest.approx(2 / (2 + 0 + 2))
    # duplicates: paper counts each copy at its best IoU, robust matches one-to-one
    dup = json.dumps(GT + [GT[0]] * 3)
    assert R.detection_reward(tagged(dup), GT, iou_mode="robust")["iou"] == pytest.approx(3 / 6)
    assert R.detection_reward(tagged(dup), GT)["iou"] == pytest.approx(1.0)
    # paper R_IoU counts a miss below the matching threshold: unit cubes 0.8 apart, IoU 0.2 / 1.8
    near = [det("chair", 0.8)]
    r = R.detection_reward(tagged(json.dumps(near)), GT)
    assert (r["iou"], r["f1"]) == (pytest.approx(1 / 9), 0.0)
    assert R.detection_reward(tagged(json.dumps(near)), GT, iou_mode="robust")["iou"] == 0.0
    # empty scene, empty answer
    r = R.detection_reward(tagged("[]"), [])
    assert r == pytest.approx({"total": 2.0, "format": 1.0, "iou": 0.0, "f1": 1.0, "n_pred": 0.0})
    assert R.detection_reward(tagged("[]"), GT)["total"] == 1.0


def test_detection_robust_never_pays_for_dropping_boxes():
    rng = np.random.default_rng(3)
    gt = [det("chair", 2.0 * i) for i in range(5)]
    pred = [{"label": "chair", "bbox_3d": [2.0 * i + rng.uniform(-.3, .3), 0, 0, 1, 1, 1, 0, 0, 0]}
            for i in range(5)]
    full = R.detection_reward(tagged(json.dumps(pred)), gt, iou_mode="robust")["iou"]
    for k in range(5):
        fewer = R.detection_reward(tagged(json.dumps(pred[:k])), gt, iou_mode="robust")["iou"]
        assert fewer < full
    # ... while the paper's R_IoU rewards keeping only the best box
    best = max(range(5), key=lambda i: B.iou_3d(pred[i]["bbox_3d"], gt[i]["bbox_3d"]))
    assert (R.detection_reward(tagged(json.dumps([pred[best]])), gt)["iou"]
            > R.detection_reward(tagged(json.dumps(pred)), gt)["iou"])


def test_detection_gt_mode_is_one_to_one_iou_over_ground_truth():
    """iou_mode "gt": the mean over ground-truth boxes of the one-to-one IoU at any overlap
    (hand-computed unit-cube IoUs: shifted by s along x, IoU = (1 - s) / (1 + s))."""
    iou = lambda s: (1 - s) / (1 + s)
    # IoU 0.2/1.8 (below the F1 threshold) and 0.9/1.1
    near = [det("chair", 0.8), det("table", 6.1)]
    r = R.detection_reward(tagged(json.dumps(near)), GT, iou_mode="gt")
    # the second chair is missed: it costs
    assert r["iou"] == pytest.approx((iou(0.8) + 0 + iou(0.1)) / 3)
    assert r["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    # a duplicate of a matched box earns nothing; it only costs through F1
    dup = R.detection_reward(tagged(json.dumps(near + [near[1]])), GT, iou_mode="gt")
    assert dup["iou"] == pytest.approx(r["iou"]) and dup["f1"] < r["f1"]
    # dropping a matched box never pays, whatever its IoU
    for k in range(2):
        fewer = R.detection_reward(tagged(json.dumps(near[:k] + near[k + 1:])), GT, iou_mode="gt")
        assert fewer["iou"] < r["iou"]
    assert (R.detection_reward(tagged(json.dumps(GT)), GT, iou_mode="gt")["iou"]
            == pytest.approx(1.0))
    assert R.detection_reward(tagged("[]"), [], iou_mode="gt")["iou"] == 1.0
    assert R.detection_reward(tagged("[]"), GT, iou_mode="gt")["iou"] == 0.0
    assert R.gt_iou(near, GT) == pytest.approx(r["iou"])


def test_detection_reward_stricter_f1_term():
    """f1_iou=0.5 (train.py --f1-iou): the F1 term counts a box only above IoU 0.5; the IoU term
    and the format term do not move. Unit cubes shifted by s along x: IoU = (1 - s) / (1 + s),
    0.2 -> 2/3, 0.4 -> 3/7 (between the two thresholds)."""
    pred = [det("chair", 0.2), det("chair", 3.4), det("table", 6.0)]  # IoUs 2/3, 3/7, 1
    paper = R.detection_reward(tagged(json.dumps(pred)), GT)
    strict = R.detection_reward(tagged(json.dumps(pred)), GT, f1_iou=0.5)
    assert paper["f1"] == 1.0
    # TP 2, FP 1, FN 1 at 0.5
    assert strict["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert strict["iou"] == paper["iou"] == pytest.approx((2 / 3 + 3 / 7 + 1) / 3)
    assert strict["format"] == 1.0 and strict["total"] == pytest.approx(1 + strict["iou"] + 2 / 3)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="f1_iou"):
            R.detection_reward(tagged("[]"), GT, f1_iou=bad)


def test_detection_parsing_variants():
    body = json.dumps(GT, indent=1)
    bare = f"```json\n{body}\n```"  # a VG-LLM checkpoint's answer: no tags
    r = R.detection_reward(bare, GT)
    assert (r["format"], r["iou"], r["f1"]) == (0.0, pytest.approx(1.0), pytest.approx(1.0))
    # fence inside answer
    assert R.detection_reward(tagged(bare), GT)["total"] == pytest.approx(3.0)
    # truncated at max_new_tokens: the complete lines still count (VG-LLM's line-by-line parser)
    lines = "[\n" + ",\n".join(json.dumps(g) for g in GT) + ",\n"
    trunc = lines + '{"label": "bed", "bbox_3d": [1, 2'
    assert len(R.parse_detections(trunc)) == 3
    # invalid entries are skipped, and they cost the format reward
    mixed = GT + [{"label": "bed", "bbox_3d": [1, 2, 3]}, {"label": 5, "bbox_3d": [0] * 9}, "x"]
    assert R.parse_detections(tagged(json.dumps(mixed))) == GT
    assert R.detection_reward(tagged(json.dumps(mixed)), GT)["format"] == 0.0
    assert R.parse_detections(
        tagged('[{"label": "a", "bbox_3d": [NaN, 0, 0, 1, 1, 1, 0, 0, 0]}]')) == []
    assert R.parse_detections(
        tagged('[{"label": "a", "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, true]}]')) == []
    assert len(R.parse_detections(tagged(json.dumps(GT * 50)))) == R.MAX_BOXES


def test_detection_reward_on_an_empty_scene():
    tagged = lambda a: f"<think>t</think><answer>{a}</answer>"
    assert rewards.detection_reward("garbage, no JSON", [])["total"] == 0.0  # was R_F1 = 1
    assert rewards.detection_reward(tagged("[{]"), [])["f1"] == 0.0
    # saying "nothing" is right: format + F1
    assert rewards.detection_reward(tagged("[]"), [])["total"] == 2.0
    # bare VG-LLM answer: F1 without format
    assert rewards.detection_reward("```json\n[]\n```", [])["f1"] == 1.0


# ---- format --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, task, expected", [
    (tagged("[]"), "detection", 1.0),
    ("  \n<think>a</think>  <answer> [] </answer>\n ", "detection", 1.0),
    ("<answer>[]</answer>", "detection", 0.0),
    ("<think>a</think><answer>[]</answer> trailing", "detection", 0.0),
    ("<think>a</think> b <answer>[]</answer>", "detection", 0.0),
    ("<think>a</think><answer>[]</answer><answer>[]</answer>", "detection", 0.0),
    ("<think><think>a</think><answer>[]</answer>", "detection", 0.0),
    ("<answer>[]</answer><think>a</think>", "detection", 0.0),
    (tagged("[{\"label\": \"a\", \"bbox_3d\": [1, 2, 3]}]"), "detection", 0.0),
    # not a list
    (tagged('{"label": "a", "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}'), "detection", 0.0),
    (tagged('{"frame": 2, "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}'), "grounding", 1.0),
    (tagged('```json\n{"frame": 2, "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}\n```'),
     "grounding", 1.0),
    (tagged('{"frame": "2", "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}'), "grounding", 0.0),
    (tagged('{"frame": 2.0, "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}'), "grounding", 0.0),
    (tagged('{"frame": true, "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}'), "grounding", 0.0),
    (tagged('{"frame": 2, "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, Infinity]}'), "grounding", 0.0),
    (tagged("B"), "spatial", 1.0),
    (tagged("  "), "spatial", 0.0),
    (tagged("B"), "unknown-task", 0.0),
])
def test_format_reward(text, task, expected):
    assert R.format_reward(text, task) == expected


# ---- grounding -----------------------------------------------------------------------------------

def test_grounding_handmade_world_transform():
    # camera 2 sits at (1, 2, 3) turned 90 deg about world z;
    # axis_align shifts the world by (0, 0, 1)
    cam = np.eye(4)
    cam[:3, :3], cam[:3, 3] = rodrigues([0, 0, 1], PI / 2), [1, 2, 3]
    align = np.eye(4)
    align[2, 3] = 1.0
    poses = np.stack([np.eye(4), np.eye(4), cam])
    # in the camera: centre (0, 0, 1), sizes (1, 2, 3); in the world the x and y extents swap
    text = tagged('{"frame": 2, "bbox_3d": [0, 0, 1, 1, 2, 3, 0, 0, 0]}')
    world = [1, 2, 5, 2, 1, 3, 0, 0, 0]
    r = R.grounding_reward(text, world, 2, poses, align)
    assert r == pytest.approx({"total": 3.0, "format": 1.0, "frame": 1.0, "iou": 1.0})
    # the paper's fixed frame term: max(0, 1 - |df| / 5); scaled to 3 frames
    # (tau = 15/32) |df| = 2 earns 0
    fixed = R.grounding_reward(text, world, 0, poses, align, frame_window="fixed")
    assert fixed["frame"] == pytest.approx(0.6)
    assert R.grounding_reward(text, world, 0, poses, align)["frame"] == 0.0
    # a target frame outside the video is a data error
    with pytest.raises(ValueError, match="gt_frame"):
        R.grounding_reward(text, world, 9, poses, align)


def test_grounding_round_trip_through_any_camera():
    rng = np.random.default_rng(5)
    for _ in range(10):
        poses = np.stack([random_rigid(rng) for _ in range(8)])
        align = random_rigid(rng)
        world = random_box(rng)
        k = int(rng.integers(0, 8))
        cam_box = B.box_from_world(world, align @ poses[k])
        text = tagged(json.dumps({"frame": k, "bbox_3d": cam_box}))
        r = R.grounding_reward(text, world, k, poses, align)
        assert (r["iou"] == pytest.approx(1.0, abs=1e-9)
                and r["total"] == pytest.approx(3.0, abs=1e-9))
        # the same box claimed in another camera's frame is somewhere else
        other = (k + 1) % 8
        assert R.grounding_reward(text.replace(f'"frame": {k}', f'"frame": {other}'), world, k,
                                  poses, align)["iou"] < 0.99


def test_grounding_out_of_range_and_failures():
    poses = np.stack([np.eye(4)] * 4)
    box = [0, 0, 0, 1, 1, 1, 0, 0, 0]
    # a frame outside the 4-frame video is no answer: no format, frame or IoU credit (issue 12)
    r = R.grounding_reward(tagged(json.dumps({"frame": 6, "bbox_3d": box})), box, 3, poses, None)
    assert r == {"total": 0.0, "format": 0.0, "frame": 0.0, "iou": 0.0}
    r = R.grounding_reward(tagged(json.dumps({"frame": -1, "bbox_3d": box})), box, 0, poses, None)
    assert r == {"total": 0.0, "format": 0.0, "frame": 0.0, "iou": 0.0}
    r = R.grounding_reward(tagged(json.dumps({"frame": 3, "bbox_3d": box})), box, 3, poses, None)
    # the last frame counts
    assert r == pytest.approx({"total": 3.0, "format": 1.0, "frame": 1.0, "iou": 1.0})
    r = R.grounding_reward(tagged(json.dumps({"frame": 10**400, "bbox_3d": box})), box, 0,
                           poses, None)
    assert (r["frame"], r["iou"]) == (0.0, 0.0)
    assert R.grounding_reward("no answer", box, 0, poses, None)["total"] == 0.0
    # bare VG-LLM style answer: task reward without the format reward
    r = R.grounding_reward('```json\n{"frame": 0, "bbox_3d": [0, 0, 0, 1, 1, 1, 0, 0, 0]}\n```',
                           box, 0, poses, None)
    assert (r["format"], r["frame"], r["iou"]) == (0.0, 1.0, pytest.approx(1.0))


def test_grounding_frame_window_scales_with_the_frame_count():
    """R_frame = max(0, 1 - |df| / tau) with tau = 5 S / 32 ("scaled", the default) or tau = 5
    ("fixed", the paper's 32-frame term). Hand values: S = 32: tau 5 (the paper's); S = 16: tau 2.5;
    S = 8: tau 1.25; S = 4: tau 0.625, so only the exact frame pays."""
    box = [0, 0, 0, 1, 1, 1, 0, 0, 0]

    def frame(pred, gt, S, **kw):
        text = tagged(json.dumps({"frame": pred, "bbox_3d": box}))
        return R.grounding_reward(text, box, gt, np.stack([np.eye(4)] * S), None, **kw)["frame"]

    for S, df, expected in ((32, 0, 1.0), (32, 1, 0.8), (32, 2, 0.6), (32, 4, 0.2), (32, 5, 0.0),
                            (32, 9, 0.0), (16, 1, 0.6), (16, 2, 0.2), (16, 3, 0.0), (8, 1, 0.2),
                            (8, 2, 0.0), (4, 0, 1.0), (4, 1, 0.0), (4, 3, 0.0), (1, 0, 1.0)):
        gt = S - 1 - df
        assert frame(gt + df, gt, S) == pytest.approx(expected, abs=1e-12), (S, df)
        assert frame(gt, gt + df, S) == pytest.approx(expected, abs=1e-12), (S, df)   # symmetric
        assert frame(gt, gt + df, S, frame_window="scaled") == pytest.approx(expected, abs=1e-12)
    for S, df, expected in ((4, 1, 0.8), (4, 3, 0.4), (8, 2, 0.6), (32, 2, 0.6), (32, 5, 0.0)):
        got = frame(S - 1, S - 1 - df, S, frame_window="fixed")
        assert got == pytest.approx(expected, abs=1e-12), (S, df)
    # without poses the frame count comes from n_frames; without either the scaled window is unknown
    text = tagged(json.dumps({"frame": 1, "bbox_3d": box}))
    r = R.grounding_reward(text, box, 0, None, None, n_frames=16)
    assert (r["frame"], r["iou"]) == (pytest.approx(0.6), 0.0)
    assert (R.grounding_reward(text, box, 0, None, None, frame_window="fixed")["frame"]
            == pytest.approx(0.8))
    with pytest.raises(ValueError, match="n_frames"):
        R.grounding_reward(text, box, 0, None, None)
    with pytest.raises(ValueError, match="frame_window"):
        R.grounding_reward(text, box, 0, np.stack([np.eye(4)] * 4), None, frame_window="paper")


def test_grounding_without_a_target_frame_pays_no_frame_term():
    """ScanRefer val rows have no target frame (gt_frame None): the frame term is 0 for every answer
    (no frame can be right or wrong), whatever the window; format and IoU are scored as usual."""
    poses = np.stack([np.eye(4)] * 4)
    box = [0, 0, 0, 1, 1, 1, 0, 0, 0]
    for f in range(4):
        text = tagged(json.dumps({"frame": f, "bbox_3d": box}))
        for window in ("scaled", "fixed"):
            r = R.grounding_reward(text, box, None, poses, None, frame_window=window)
            assert r == pytest.approx(
                {"total": 2.0, "format": 1.0, "frame": 0.0, "iou": 1.0}), (f, window)
    assert R.grounding_reward("no answer", box, None, poses, None)["total"] == 0.0


def test_gt_iou_needs_a_said_nothing_on_an_empty_scene():
    """On a scene without objects an explicit empty list is perfect (IoU over GT 1, like F1)
    and boxes or text that does not parse earn 0, in the function and in the "gt" detection
    reward (its F1 already did)."""
    assert R.gt_iou([], []) == 1.0 and R.gt_iou([det("chair", 0.0)], []) == 0.0
    assert R.gt_iou([], [], parsed=False) == 0.0
    for text, iou, f1 in ((tagged("[]"), 1.0, 1.0), ("```json\n[]\n```", 1.0, 1.0),
                          ("garbage", 0.0, 0.0), (tagged("[{]"), 0.0, 0.0),
                          (tagged(json.dumps([det("chair", 0.0)])), 0.0, 0.0)):
        r = R.detection_reward(text, [], iou_mode="gt")
        assert (r["iou"], r["f1"]) == (iou, f1), text


def test_grounding_frame_outside_the_video_earns_nothing():
    box = [0, 0, 0, 1, 1, 1, 0, 0, 0]
    text = lambda f: f'<think>t</think><answer>{{"frame": {f}, "bbox_3d": {box}}}</answer>'
    poses = [[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]] * 2
    assert rewards.format_reward(text(2), "grounding", n_frames=2) == 0.0
    assert rewards.format_reward(text(1), "grounding", n_frames=2) == 1.0
    # was format 1 + frame 0.8
    assert rewards.grounding_reward(text(2), box, 1, poses)["total"] == 0.0
    assert rewards.grounding_reward(text(1), box, 1, poses)["total"] == pytest.approx(3.0)


# ---- VSI-Bench -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    ("A", "A", 1.0), ("a", "A", 1.0), ("A.", "A", 1.0), ("A. 3 chairs", "A", 1.0), ("B", "A", 0.0),
    ("The answer is A", "A", 0.0), ("A,", "A", 0.0), ("(A)", "A", 0.0), (" A", "A", 1.0),
    ("", "A", 0.0),
])
def test_choice_accuracy(pred, gt, expected):
    assert R.choice_accuracy(pred, gt) == expected


@pytest.mark.parametrize("pred, gt, expected", [
    ("10", "10", 1.0), ("10.0 meters", "10", 1.0), ("3.", "3", 1.0),
    ("15", "10", 0.1),   # |d|/g = 0.5 <= 1 - 0.5 exactly
    ("16", "10", 0.0),
    ("13", "10", 0.5),   # 0.3 <= 1 - t for t in .50 .. .70 (1 - .7 = 0.30000000000000004 in floats)
    # float boundaries, pinned: mathematically 0.2 and 0.7, but
    # 1 - 0.55 = 0.44999999999999996 < 0.45 and 1 - 0.8 = 0.19999999999999996 < 0.2 in float64,
    # exactly as in VSI-Bench's own code
    ("14.5", "10", 0.1), ("12", "10", 0.6),
    ("abc", "10", 0.0), ("nan", "10", 0.0), ("inf", "10", 0.0), ("1e999", "10", 0.0),
    ("5", "0", 0.0), ("5", "x", 0.0), ("", "10", 0.0), ("3,5", "3.5", 0.0), ("-10", "10", 0.0),
])
def test_mra(pred, gt, expected):
    assert R.mra(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_spatial_reward():
    assert R.spatial_reward(tagged("B. left"), "B", options=["A. right", "B. left"]) == \
        {"total": 2.0, "format": 1.0, "accuracy": 1.0}
    assert (R.spatial_reward("B", "B", options=["A. x", "B. y"])
            == {"total": 1.0, "format": 0.0, "accuracy": 1.0})
    assert R.spatial_reward(tagged("2.25"), "2.5")["accuracy"] == pytest.approx(0.9)  # |d|/g = 0.1
    assert R.spatial_reward(tagged(""), "2.5") == {"total": 0.0, "format": 0.0, "accuracy": 0.0}


# ---- totality: huge outputs and fuzzing ----------------------------------------------------------

POSES = np.stack([np.eye(4)] * 4)
BOX = [0, 0, 0, 1, 1, 1, 0, 0, 0]


def all_rewards(text):
    yield "det", R.detection_reward(text, GT)
    yield "det_robust", R.detection_reward(text, GT, iou_mode="robust")
    yield "det_gt", R.detection_reward(text, GT, iou_mode="gt")
    yield "ground", R.grounding_reward(text, BOX, 1, POSES, np.eye(4))
    yield "mc", R.spatial_reward(text, "A", options=["A. a", "B. b"])
    yield "num", R.spatial_reward(text, "3.5")


def check_ranges(name, r):
    assert all(isinstance(v, float) and math.isfinite(v) for v in r.values()), (name, r)
    assert r["format"] in (0.0, 1.0)
    parts = [v for k, v in r.items() if k not in ("total", "format", "n_pred")]
    assert all(0.0 <= v <= 1.0 for v in parts), (name, r)
    assert r["total"] == pytest.approx(r["format"] + sum(parts))
    if "n_pred" in r:
        assert 0 <= r["n_pred"] <= R.MAX_BOXES


def megabyte_texts():
    box = json.dumps(GT[0])
    many = "[" + ",".join([box] * (2**20 // len(box))) + "]"
    yield tagged(many)                                        # ~13k boxes of valid JSON
    yield many[: 2**20 - 7]                                   # truncated, no tags
    yield "\n".join([box + ","] * (2**20 // len(box)))        # line by line
    yield tagged("[" * 2**20)                                 # deep nesting
    yield "<answer>" * (2**20 // 8)                           # unclosed tags
    yield "<think>" + "</think><answer>" * (2**20 // 16)      # many tags
    yield tagged('{"frame": 1, "bbox_3d": [' + "9" * 2**20 + "]}")  # one huge number
    yield "x" * 2**20


def test_megabyte_outputs_finish():
    for text in megabyte_texts():
        assert len(text) >= 2**20 - 16
        for name, r in all_rewards(text):
            check_ranges(name, r)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**300, 10**300),
                    st.sampled_from([0, 1, -1, 0.5, 1e308, -1e-308]), st.booleans(), st.none(),
                    st.text(max_size=3))
boxes = (st.lists(numbers, min_size=0, max_size=11)
         | st.lists(st.floats(-5, 5), min_size=9, max_size=9))
entries = (st.fixed_dictionaries({"label": st.sampled_from(["chair", "table", "bed"]) | numbers,
                                  "bbox_3d": boxes})
           | st.fixed_dictionaries({"frame": numbers, "bbox_3d": boxes}))
leaves = st.one_of(numbers, boxes)
values = st.recursive(st.one_of(entries, leaves),
                      lambda c: (st.lists(c, max_size=6)
                                 | st.dictionaries(st.text(max_size=6), c, max_size=4)),
                      max_leaves=30)


plausible_box = st.tuples(st.floats(-1, 7), st.floats(-1, 1), st.floats(-1, 1), st.floats(0.05, 3),
                          st.floats(0.05, 3), st.floats(0.05, 3), st.floats(-4, 4),
                          st.floats(-4, 4), st.floats(-4, 4)).map(list)
detection = st.fixed_dictionaries({"label": st.sampled_from(["chair", "table", "bed"]),
                                   "bbox_3d": plausible_box})
grounding = st.fixed_dictionaries({"frame": st.integers(-2, 6), "bbox_3d": plausible_box})
spatial = st.sampled_from(["A", "a.", "B. b", " A", "3.5", "3.4 m", "nan", "4e0", "-3.5", "1e999"])


@st.composite
def bodies(draw):
    kind = draw(st.integers(0, 9))
    if kind in (4, 5):  # answers that parse: boxes near the ground truth, mixed with broken entries
        return json.dumps(draw(st.lists(detection | entries, max_size=8)), allow_nan=True,
                          indent=draw(st.sampled_from([None, 1])))
    if kind in (6, 7):
        return json.dumps(draw(grounding | entries), allow_nan=True)
    if kind == 8:
        return draw(spatial)
    if kind == 0:
        return draw(st.text(max_size=300))
    if kind == 1:  # random text around tag and fence fragments
        parts = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "```json", "```",
                                 "\n", '"bbox_3d"', '"frame": ', "[", "{", "}", "]", ",", "NaN",
                                 "1e999", "A", "3.5"])
        return "".join(draw(st.lists(parts | st.text(max_size=5), max_size=40)))
    return json.dumps(draw(values), allow_nan=True, indent=draw(st.sampled_from([None, 1])))


@st.composite
def outputs(draw):
    """Six strings per example: the body bare, tagged, fenced, truncated (bare
    and tagged), deeply nested."""
    body = draw(bodies())
    cut = body[: draw(st.integers(0, len(body)))]
    think = draw(st.text(max_size=20))
    return [body, tagged(body, think), tagged("```json\n" + body + "\n```"), cut,
            tagged(cut, think), "[" * draw(st.integers(0, 3000)) + body]


N_FUZZ = 1700  # examples x 6 strings = 10,200 strings, each scored by every reward


@settings(max_examples=N_FUZZ, deadline=None, suppress_health_check=list(HealthCheck))
@given(outputs())
def test_fuzz_rewards(texts):
    for text in texts:
        for name, r in all_rewards(text):
            check_ranges(name, r)
        for task in ("detection", "grounding", "spatial"):
            assert R.format_reward(text, task) in (0.0, 1.0)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=2000) | bodies())
def test_fuzz_parsers(text):
    dets = R.parse_detections(text)
    assert all(len(d["bbox_3d"]) == 9 and all(math.isfinite(v) for v in d["bbox_3d"]) for d in dets)
    g = R.parse_grounding(text)
    assert g is None or (type(g[0]) is int and len(g[1]) == 9)
    s = R.parse_spatial(text)
    assert s is None or (isinstance(s, str) and s)
