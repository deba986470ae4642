"""Paper-comparable evaluation and real-data plumbing: the two protocols where they differ
(hand-built cases), VG-LLM's floor frame sampling, proposal refinement, --data mixes (proportions,
exact resume), what a run read."""
import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import boxes
import data
import eval as evaluation
import published
import rewards
import rft3d
import scenes
import train
from independent import R_zxy, rot
from test_train import FAST, assert_resume_exact


# ---- frame sampling: VG-LLM floors np.linspace(0, N - 1, n) --------------------------------------
def test_frame_indices_floor_like_vgllm_for_a_100_frame_video():
    floor = [i * 99 // 31 for i in range(32)]   # exact integer arithmetic: floor(i * 99 / 31)
    assert data.frame_indices(100, 32).tolist() == floor
    rounded = [math.floor(Fraction(i * 99, 31) + Fraction(1, 2)) for i in range(32)]
    # what rounding would change (the count)
    assert sum(f != r for f, r in zip(floor, rounded)) == 15
    assert (data.frame_indices(100, 2).tolist() == [0, 99]
            and data.frame_indices(100, 3).tolist() == [0, 49, 99])
    assert (data.frame_indices(5, 8).tolist() == data.frame_indices(5, None).tolist()
            == [0, 1, 2, 3, 4])


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


def test_protocols_differ_on_a_perfect_tilted_answer():
    E = np.eye(4)
    E[:3, :3], E[:3, 3] = rot(0, -1.2), [1.0, 2.0, 0.5]
    cam = [0.3, -0.2, 2.5, 2.0, 0.4, 0.4, 0.4, 0.0, 0.0]
    s = _grounding_sample(cam, E)
    text = json.dumps({"frame": 1, "bbox_3d": cam})
    ours, pub = (rft3d.TASKS["grounding"].record(s, text, protocol=p)
                 for p in ("ours", "published"))
    assert ours["iou"] == pytest.approx(1.0) and 0.25 <= pub["iou"] < 0.5
    m_ours, m_pub = evaluation.grounding_metrics([ours]), evaluation.grounding_metrics([pub])
    assert (m_ours["acc@0.25"], m_ours["acc@0.5"]) == (100.0, 100.0)
    assert (m_pub["acc@0.25"], m_pub["acc@0.5"]) == (100.0, 0.0)   # the box's Acc@0.5 changes
    with pytest.raises(ValueError, match="protocol"):
        rft3d.TASKS["grounding"].record(s, text, protocol="paper")


# ---- VSI-Bench's first token, VG-LLM's detection line count --------------------------------------
def test_vsibench_first_token_without_stripping():
    mc = data.Sample(id="q", task="spatial", frames=np.zeros((1, 4, 4, 3), np.uint8),
                     question="left or right?", options=["A. left", "B. right"], ground_truth="A",
                     question_type="object_rel_direction_easy")
    num = data.Sample(id="n", task="spatial", frames=mc.frames, question="how many?",
                      ground_truth="4", question_type="object_counting")
    score = lambda s, text, p: rft3d.TASKS["spatial"].record(s, text, protocol=p)["score"]
    for text, ours, pub in ((" A", 1.0, 0.0), ("A", 1.0, 1.0), ("a.", 1.0, 1.0),
                            ("A. left", 1.0, 1.0), ("<answer> A</answer>", 1.0, 0.0),
                            ("B", 0.0, 0.0), ("\nA", 1.0, 1.0)):
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
    ours = rft3d.TASKS["detection"].record(s, text, protocol="ours")
    pub = rft3d.TASKS["detection"].record(s, text, protocol="published")
    assert ours["counts"]["0.25"] == {"chair": [0, 100, 1]} and ours["n_pred"] == 100
    assert pub["counts"]["0.25"] == {"chair": [1, 100, 0]} and pub["n_pred"] == 101
    # not valid JSON: VG-LLM's line-by-line reading, still every line
    truncated = text[: text.rindex("]")]
    assert (rft3d.TASKS["detection"].record(s, truncated, protocol="published")["counts"]["0.25"]
            == {"chair": [1, 100, 0]})


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


# ---- --data mixes --------------------------------------------------------------------------------
def test_parse_files(tmp_path):
    assert (data.parse_files(["a.json:2", "b.json", "c.json:1"])
            == [("a.json", 2), ("b.json", 1), ("c.json", 1)])
    assert (data.parse_files([r"C:\data\x.json", "host:rows.json"])
            == [(r"C:\data\x.json", 1), ("host:rows.json", 1)])
    for bad in ("a.json:0", "a.json:1.5", "a.json:-2", "a.json:nan"):
        with pytest.raises(ValueError, match="whole number"):
            data.parse_files([bad])
    with pytest.raises(SystemExit):
        train.get_args(["--data", "a.json:0.5"])
    a, b = tmp_path / "a.json", tmp_path / "b.json"   # train.py checks that the files exist
    a.write_text("[]"), b.write_text("[]")
    assert (train.get_args(["--data", f"{a}:3", str(b), "--val-data", str(b)]).data
            == [(str(a), 3), (str(b), 1)])


def test_mix_sampler_proportions_and_purity():
    mix, per_rank, world = [(7, 2), (3, 1)], 4, 2
    samplers = [data.StepSampler(10, per_rank, r, world, seed=5, start_step=0, mix=mix)
                for r in range(world)]
    # the global batches in order
    stream = [i for step in range(300) for s in samplers for i in s.indices(step)]
    from_a = [i for i in stream if i < 7]
    assert len(from_a) == 2 * (len(stream) - len(from_a))  # 2:1 exactly (every block of 3 holds it)
    for block in range(0, len(stream), 3):
        assert sum(i < 7 for i in stream[block:block + 3]) == 2
    for rows, part in ((range(7), from_a), (range(7, 10), [i for i in stream if i >= 7])):
        counts = [part.count(i) for i in rows]  # epochs: every row equally often (+- 1)
        assert max(counts) - min(counts) <= 1
    assert stream[:30] != sorted(stream[:30])                       # shuffled
    # a resumed run
    later = data.StepSampler(10, per_rank, 1, world, seed=5, start_step=123, mix=mix)
    assert next(iter(later)) == samplers[1].indices(123)
    # no mix: the former sampler, unchanged
    one = data.StepSampler(10, per_rank, 0, 1, seed=5, start_step=0)
    first = (np.random.default_rng((5, 0)).permutation(10)).tolist()
    assert one.indices(0) + one.indices(1) + [one.indices(2)[0], one.indices(2)[1]] == first


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    return train.tiny_init(train.get_args(["--out", str(out), "--frames", "2"]), rank=0)


def test_mix_trains_and_resumes_bit_exactly(init_dir, tmp_path):
    a = data.export_vgllm(scenes.SyntheticDataset("detection", 5, seed=11, frames=2),
                          str(tmp_path / "a"))
    b = data.export_vgllm(scenes.SyntheticDataset("detection", 3, seed=12, frames=2),
                          str(tmp_path / "b"))
    common = ["--stage", "sft", "--task", "detection", "--model", init_dir, "--data", f"{a}:2",
              f"{b}:1", "--val-data", str(b), "--batch-size", "3", "--save-every", "1",
              "--eval-every", "100", "--lr", "1e-2", *FAST]
    assert_resume_exact(common, "sft", tmp_path)
    starts = json.loads((tmp_path / "b/sft/data.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [0, 1] and starts[1]["mix"] == [[5, 2], [3, 1]]
    for start in starts:
        assert [f["sha256"] for f in start["train"]] == [
            hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b)]
        assert [f["rows"] for f in start["train"]] == [5, 3] and start["val"][0]["rows"] == 3


# ---- eval.py end to end: protocol, proposals, what was read --------------------------------------
def test_eval_main_records_protocol_data_and_refined_metrics(init_dir, tmp_path):
    ds = scenes.SyntheticDataset("grounding", 3, seed=13, frames=2)
    path = data.export_vgllm(ds, str(tmp_path / "d"))
    scenes_in_file = {Path(r["images"][0]).parent.name for r in json.load(open(path))}
    props = tmp_path / "props.json"
    props.write_text(json.dumps({sc: [[0, 0, 1, 1, 1, 1]] for sc in scenes_in_file}))
    argv = ["--ckpt", init_dir, "--task", "grounding", "--data", path, "--frames", "2",
            "--max-new-tokens", "8", "--protocol", "published", "--proposals", str(props),
            "--out", str(tmp_path / "ev")]
    evaluation.main(argv)
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert (m["protocol"] == "published"
            and m["data"][0]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest())
    assert (m["data"][0]["rows"] == 3 and m["proposals"]["scenes"] == 3
            and m["proposals"]["boxes"] == 3)
    for key in ("acc@0.25", "acc@0.5", "acc@0.25/refined", "acc@0.5/refined", "replaced_rate"):
        assert math.isfinite(m[key]), key
    props.write_text(json.dumps({"elsewhere": []}))
    with pytest.raises(SystemExit, match="no proposals for scene"):  # one line, no traceback
        evaluation.main(argv)
