"""published.py: VG-LLM's published protocol where it differs from ours, and proposals."""
import json
import math

import numpy as np
import pytest

import boxes
import data
import eval as evaluation
import published
import rewards
import rft3d
from independent import R_zxy, rot


# ---- ScanRefer: VG-LLM's angle conversion --------------------------------------------------------
def extrinsic_zxy(a, b, c):
    """scipy's from_euler("zxy", [a, b, c]) from the definition: rotate a vector about
    the fixed z axis by a, then about the fixed x axis by b, then about the fixed y axis
    by c (built column by column)."""
    turn = lambda v: rot(1, c) @ (rot(0, b) @ (rot(2, a) @ v))
    return np.stack([turn(e) for e in np.eye(3)], axis=1)


def test_published_conversion_is_scipys_extrinsic_zxy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        box = [*rng.normal(size=3), *rng.uniform(0.2, 2, 3), *rng.uniform(-3, 3, 3)]
        E = np.eye(4)
        E[:3, :3], E[:3, 3] = R_zxy(*rng.uniform(-3, 3, 3)), rng.normal(size=3)
        out = published.box_to_world(box, E)
        a, b, c = out[6:9]
        # the new angles are extrinsic z-x-y angles of E @ from_euler("zxy", old angles),
        # in scipy's ranges
        assert np.allclose(extrinsic_zxy(a, b, c), E[:3, :3] @ extrinsic_zxy(*box[6:9]), atol=1e-9)
        assert -math.pi / 2 <= b <= math.pi / 2 and abs(a) <= math.pi and abs(c) <= math.pi
        assert np.allclose(out[:3], E[:3, :3] @ box[:3] + E[:3, 3]) and out[3:6] == box[3:6]
    scipy = pytest.importorskip("scipy.spatial.transform")   # optional: not a dependency of ours
    R = scipy.Rotation.from_euler("zxy", box[6:9])
    expect = scipy.Rotation.from_matrix(E[:3, :3] @ R.as_matrix()).as_euler("zxy")
    assert np.allclose(out[6:9], expect, atol=1e-9)


def test_published_rotation_by_hand():
    """Camera box with yaw a only, camera-to-world E = Rx(beta): VG-LLM's evaluator gives the world
    box the angles (a, beta, 0) (because Rx(beta) Rz(a) = Ry(0) Rx(beta) Rz(a) is extrinsic z-x-y),
    which the IoU code reads as Rz(a) Rx(beta); the true rotation is Rx(beta) Rz(a)."""
    a, beta = 0.4, -1.2
    E = np.eye(4)
    E[:3, :3] = rot(0, beta)
    box = [0.3, -0.2, 2.5, 2.0, 0.4, 0.4, a, 0.0, 0.0]
    assert np.allclose(published.box_to_world(box, E)[6:9], [a, beta, 0.0], atol=1e-12)
    assert np.allclose(R_zxy(*boxes.box_to_world(box, E)[6:9]), rot(0, beta) @ rot(2, a),
                       atol=1e-12)
    pure_yaw = np.eye(4)
    pure_yaw[:3, :3] = rot(2, 0.9)   # both yaw only: the two conventions agree
    assert np.allclose(published.box_to_world(box, pure_yaw), boxes.box_to_world(box, pure_yaw),
                       atol=1e-12)


def _grounding_sample(cam_box, E):
    world = boxes.box_to_world(cam_box, E)  # the true world box (intrinsic Z-X-Y, DESIGN section 3)
    return data.Sample(id="g0", task="grounding", frames=np.zeros((2, 4, 4, 3), np.uint8),
                       cam2global=np.stack([np.eye(4), E]), world_box=world, target_frame=1,
                       target_box=cam_box, description="the box", meta={"unique": True})


def record(task, s, text, protocol):
    """eval.evaluate's record of one sample under a protocol."""
    return rft3d.TASKS[task].record(s, text, **published.record_opts(task, protocol))


def test_protocols_differ_on_a_perfect_tilted_answer():
    E = np.eye(4)
    E[:3, :3], E[:3, 3] = rot(0, -1.2), [1.0, 2.0, 0.5]
    cam = [0.3, -0.2, 2.5, 2.0, 0.4, 0.4, 0.4, 0.0, 0.0]
    s = _grounding_sample(cam, E)
    text = json.dumps({"frame": 1, "bbox_3d": cam})
    ours, pub = (record("grounding", s, text, p) for p in ("ours", "published"))
    assert ours["iou"] == pytest.approx(1.0) and 0.25 <= pub["iou"] < 0.5
    m_ours, m_pub = evaluation.grounding_metrics([ours]), evaluation.grounding_metrics([pub])
    assert (m_ours["acc@0.25"], m_ours["acc@0.5"]) == (100.0, 100.0)
    assert (m_pub["acc@0.25"], m_pub["acc@0.5"]) == (100.0, 0.0)   # the box's Acc@0.5 changes
    with pytest.raises(ValueError, match="protocol"):
        record("grounding", s, text, "paper")


# ---- VSI-Bench's first token, VG-LLM's detection line count --------------------------------------
def test_vsibench_first_token_without_stripping():
    mc = data.Sample(id="q", task="spatial", frames=np.zeros((1, 4, 4, 3), np.uint8),
                     question="left or right?", options=["A. left", "B. right"], ground_truth="A",
                     question_type="object_rel_direction_easy")
    num = data.Sample(id="n", task="spatial", frames=mc.frames, question="how many?",
                      ground_truth="4", question_type="object_counting")
    score = lambda s, text, p: record("spatial", s, text, p)["score"]
    for text, ours, pub in ((" A", 1.0, 0.0), ("A", 1.0, 1.0), ("a.", 1.0, 1.0),
                            ("A. left", 1.0, 1.0), ("<answer> A</answer>", 1.0, 0.0),
                            ("B", 0.0, 0.0), ("\nA", 1.0, 1.0), ("A.\n", 1.0, 0.0)):
        assert (score(mc, text, "ours"), score(mc, text, "published")) == (ours, pub), text
    # numbers: MRA of the first token; 5 vs 4 is within 1 - t for t = 0.50..0.75: 6 of 10 thresholds
    for text, ours, pub in ((" 4", 1.0, 0.0), ("4", 1.0, 1.0), ("4 chairs", 1.0, 1.0),
                            ("5", 0.6, 0.6)):
        assert ((score(num, text, "ours"), score(num, text, "published"))
                == pytest.approx((ours, pub))), text


def test_published_detection_counts_every_line():
    gt = [{"label": "chair", "bbox_3d": [0, 0, 2, 1, 1, 1, 0, 0, 0]}]
    s = data.Sample(id="d", task="detection", frames=np.zeros((1, 4, 4, 3), np.uint8), boxes=gt)
    decoys = [{"label": "chair", "bbox_3d": [10 + i, 0, 2, 1, 1, 1, 0, 0, 0]}
              for i in range(rewards.MAX_BOXES)]
    # the hit is box 101
    text = "```json\n[\n" + ",\n".join(json.dumps(b) for b in decoys + gt) + "\n]```"
    ours, pub = (record("detection", s, text, p) for p in ("ours", "published"))
    assert ours["counts"]["0.25"] == {"chair": [0, 100, 1]} and ours["n_pred"] == 100
    assert pub["counts"]["0.25"] == {"chair": [1, 100, 0]} and pub["n_pred"] == 101
    # not valid JSON: VG-LLM's line-by-line reading, still every line
    truncated = text[: text.rindex("]")]
    pub = record("detection", s, truncated, "published")
    assert pub["counts"]["0.25"] == {"chair": [1, 100, 0]}


# ---- proposal refinement -------------------------------------------------------------------------
def test_proposal_refinement_turns_a_miss_into_a_hit(tmp_path):
    gt = [1.0, 2.0, 0.5, 1.0, 0.6, 0.8, 0.0, 0.0, 0.0]
    # shifted by 0.7 of its length: IoU 0.3 / 1.7
    pred = [1.7, 2.0, 0.5, 1.0, 0.6, 0.8, 0.0, 0.0, 0.0]
    # a detector box on the object (6 numbers: axis-aligned)
    near = [1.02, 2.0, 0.5, 1.0, 0.6, 0.8]
    decoy = [2.5, 2.0, 0.5, 1.0, 0.6, 0.8, 0.0, 0.0, 0.0]  # overlaps pred less (0.2 / 1.8)
    far = {"bbox_3d": [9.0, 9.0, 0.5, 1.0, 1.0, 1.0, 0.3, 0.0, 0.0], "label": "table"}
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps({"scene0011_00": [far, decoy, near], "scene0012_00": []}))
    props = published.load_proposals(str(path))
    assert props["scene0011_00"][2] == near + [0.0, 0.0, 0.0] and props["scene0012_00"] == []
    assert boxes.iou_3d(pred, gt) == pytest.approx(0.3 / 1.7)   # a miss
    iou, k = published.refine(pred, gt, props["scene0011_00"])
    assert k == 2 and iou == pytest.approx(0.98 / 1.02)  # the proposal on the object: a hit
    assert published.refine(pred, gt, []) == (pytest.approx(0.3 / 1.7), None)   # nothing to snap to
    assert published.refine(None, gt, props["scene0011_00"]) == (0.0, None)
    records = [{"iou": 0.3 / 1.7, "iou_refined": iou, "proposal": k, "unique": True},
               # refinement can hurt too
               {"iou": 0.6, "iou_refined": 0.2, "proposal": 0, "unique": False}]
    m = evaluation.grounding_metrics(records)
    assert ((m["acc@0.25"], m["acc@0.5"], m["acc@0.25/refined"], m["acc@0.5/refined"])
            == (50.0, 50.0, 50.0, 50.0))
    assert ((m["acc@0.5/unique"], m["acc@0.5/unique/refined"]) == (0.0, 100.0)
            and m["replaced_rate"] == 100.0)
    for bad, where in (([[1, 2, 3, 1, 1]], "box 0"), ([[0, 0, 0, 1, -1, 1]], "box 0"),
                       ({"x": 1}, "list")):
        path.write_text(json.dumps({"scene0011_00": bad}))
        with pytest.raises(ValueError, match=rf"proposals.*scene0011_00.*{where}"):
            published.load_proposals(str(path))
