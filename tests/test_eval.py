"""eval.py: metric aggregation against hand-computed numbers, and the eval command."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import compare as C
import data
import eval as E
import eval as evaluation
import scenes
from test_train import torchrun


def test_class_lists_are_vgllms():
    assert [len(E.CLASS_LISTS[n]) for n in (8, 20, 31)] == [8, 20, 31]
    assert (E.CLASS_LISTS[31].count("lamp") == 2 and "towl" in E.CLASS_LISTS[31]
            and "towel" not in E.CLASS_LISTS[31])
    assert (E.CLASS_LISTS[20] == E.CLASS_LISTS[31][:20]
            and set(E.CLASS_LISTS[8]) <= set(E.CLASS_LISTS[20]))


def det_record(c25, c50=None, n_pred=0, n_gt=0, iou_gt=0.0, parsed=True):
    return {"counts": {"0.25": c25, "0.5": c50 or {}}, "n_pred": n_pred, "n_gt": n_gt,
            "iou_gt": iou_gt, "parsed": parsed}


def test_detection_metrics_sums_per_class_then_averages_over_lists():
    records = [det_record({"chair": [2, 1, 1], "lamp": [1, 0, 0]}, {"chair": [1, 2, 2]}, 4, 4, 0.5),
               det_record({"chair": [1, 0, 2], "sofa": [0, 3, 0]}, {}, 4, 3, 0.25),
               det_record({}, {}, 0, 0, 0.0, parsed=False)]
    m = E.detection_metrics(records)
    # chair: TP 3, FP 1, FN 3 over the set -> P 3/4, R 1/2, F1 0.6; lamp: 1/1/1;
    # sofa (in no list): 0/0/0
    chair = m["per_class"]["0.25"]["chair"]
    assert (chair["tp"], chair["fp"], chair["fn"]) == (3, 1, 3)
    assert (chair["precision"], chair["recall"], chair["f1"]) == pytest.approx((75.0, 50.0, 60.0))
    assert m["f1@0.25/cate8"] == pytest.approx(60.0 / 8)          # absent classes count 0
    assert m["precision@0.25/cate8"] == pytest.approx(75.0 / 8)
    assert m["recall@0.25/cate8"] == pytest.approx(50.0 / 8)
    assert m["f1@0.25/cate20"] == pytest.approx((60.0 + 100.0) / 20)
    assert m["f1@0.25/cate31"] == pytest.approx((60.0 + 2 * 100.0) / 31)  # "lamp" is listed twice
    # micro over all labels: TP 4, FP 4, FN 3
    assert m["precision@0.25/micro"] == pytest.approx(50.0)
    assert m["recall@0.25/micro"] == pytest.approx(400 / 7)
    assert m["f1@0.25/micro"] == pytest.approx(100 * 8 / 15)
    # IoU 0.5: chair 1/2/2 -> P 1/3, R 1/3, F1 1/3
    assert m["f1@0.5/cate8"] == pytest.approx(100 / 3 / 8)
    assert m["n_pred"] == pytest.approx(8 / 3) and m["n_gt"] == pytest.approx(7 / 3)
    # sample 1 only: sample 3 is an empty scene whose answer did not parse, which names no count
    assert m["count_acc"] == pytest.approx(100 / 3)
    assert m["iou_gt"] == pytest.approx(0.25) and m["parse_rate"] == pytest.approx(200 / 3)
    assert m["n"] == 3


def test_detection_metrics_empty():
    m = E.detection_metrics([])
    assert m["f1@0.25/cate31"] == 0.0 and m["n"] == 0 and m["parse_rate"] == 0.0


def test_grounding_metrics():
    records = [
        # counts at 0.25 (>=)
        {"iou": 0.25, "frame_pred": 3, "frame_gt": 3, "unique": True, "parsed": True},
        # counts at both
        {"iou": 0.5, "frame_pred": 1, "frame_gt": 2, "unique": False, "parsed": True},
        {"iou": 0.4999, "frame_pred": 0, "frame_gt": 0, "unique": False, "parsed": True},
        # failure
        {"iou": None, "frame_pred": None, "frame_gt": 4, "unique": None, "parsed": False},
        {"iou": 0.1, "frame_pred": 2, "frame_gt": 2, "unique": True, "parsed": True},
    ]
    m = E.grounding_metrics(records)
    assert m["acc@0.25"] == pytest.approx(60.0) and m["acc@0.5"] == pytest.approx(20.0)
    assert m["acc@0.25/unique"] == pytest.approx(50.0) and m["acc@0.5/unique"] == 0.0
    assert (m["acc@0.25/multiple"] == pytest.approx(100.0)
            and m["acc@0.5/multiple"] == pytest.approx(50.0))
    assert (m["n/unique"], m["n/multiple"], m["n"]) == (2, 2, 5)
    assert m["frame_acc"] == pytest.approx(60.0)
    assert m["iou"] == pytest.approx((0.25 + 0.5 + 0.4999 + 0.1) / 5)
    assert m["parse_rate"] == pytest.approx(80.0)
    assert "acc@0.25/unique" not in E.grounding_metrics(
        [{"iou": 1.0, "frame_pred": 0, "frame_gt": 0}])


def test_frame_accuracy_counts_only_rows_with_a_target_frame():
    """ScanRefer val rows have no target frame (frame_gt None): left out of frame accuracy, counted
    in n_frame; IoU and Acc keep every row."""
    records = [
        {"iou": 0.6, "frame_pred": 3, "frame_gt": 3, "unique": True, "parsed": True},  # right frame
        {"iou": 0.3, "frame_pred": 1, "frame_gt": 2, "unique": True, "parsed": True},  # wrong frame
        # no target frame
        {"iou": 0.9, "frame_pred": 0, "frame_gt": None, "unique": False, "parsed": True},
        {"iou": None, "frame_pred": None, "frame_gt": None, "unique": False, "parsed": False},
        # a failure: wrong
        {"iou": None, "frame_pred": None, "frame_gt": 4, "unique": None, "parsed": False},
    ]
    m = E.grounding_metrics(records)
    # 1 right of the 3 with a frame
    assert m["n_frame"] == 3 and m["frame_acc"] == pytest.approx(100 / 3)
    assert (m["n"] == 5 and m["acc@0.25"] == pytest.approx(60.0)
            and m["iou"] == pytest.approx(1.8 / 5))
    # no row has a frame: no frame accuracy at all
    none = E.grounding_metrics([records[2], records[3]])
    assert (none["n_frame"] == 0 and "frame_acc" not in none
            and none["acc@0.25"] == pytest.approx(50.0))
    # per scene: aligned with the records, NaN where a row has no frame (undefined, not wrong)
    per = C.per_scene("grounding", records)
    assert len(per["frame"]) == 5 and np.isnan(per["frame"][[2, 3]]).all()
    assert per["frame"][[0, 1, 4]].tolist() == [1.0, 0.0, 0.0]
    assert per["iou"].tolist() == pytest.approx([0.6, 0.3, 0.9, 0.0, 0.0])
    assert (per["acc25"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
            and per["parse"].tolist() == [1, 1, 1, 0, 0])


def test_spatial_metrics_merge_directions_and_average_tasks():
    rec = lambda qt, s: {"question_type": qt, "score": s, "parsed": True}
    records = [rec("object_counting", 1.0), rec("object_counting", 0.5),
               rec("object_rel_direction_easy", 1.0),
               rec("object_rel_direction_medium", 0.0), rec("object_rel_direction_medium", 1.0),
               rec("object_rel_direction_hard", 0.0),
               rec("room_size_estimation", 0.2),
               {"question_type": "route_planning", "score": None, "parsed": False}]
    m = E.spatial_metrics(records)
    assert m["object_counting"] == pytest.approx(75.0)
    # mean of the 3 means
    assert m["object_rel_direction"] == pytest.approx((100.0 + 50.0 + 0.0) / 3)
    assert "object_rel_direction_easy" not in m
    assert m["room_size_estimation"] == pytest.approx(20.0) and m["route_planning"] == 0.0
    assert m["overall"] == pytest.approx((75.0 + 50.0 + 20.0 + 0.0) / 4)  # unweighted over tasks
    assert m["parse_rate"] == pytest.approx(700 / 8) and m["n"] == 8


def test_print_table_shows_every_class(capsys):
    import eval as evaluation
    records = [{"counts": {"0.25": {"chair": [1, 0, 1], "lamp": [0, 2, 0]},
                           "0.5": {"chair": [0, 1, 2]}},
                "n_pred": 3, "n_gt": 2, "iou_gt": 0.3, "parsed": True}]
    evaluation.print_table("detection", evaluation.detection_metrics(records))
    out = capsys.readouterr().out
    assert "per class @ IoU 0.25" in out and "per class @ IoU 0.5" in out
    chair = [line.split() for line in out.splitlines() if line.strip().startswith("chair")]
    # F1 = 2TP/(2TP+FP+FN)
    assert chair[0][1:4] == ["1", "0", "1"] and abs(float(chair[0][-1]) - 100 * 2 / 3) < 0.01


# ---- eval.py end to end: two ranks, samples, shifted test worlds ---------------------------------
def test_eval_two_ranks_gather_every_record_once(init_dir, tmp_path):
    """torchrun --nproc_per_node 2 eval.py on 5 scenes (an odd count: rank 1's shard is padded with
    a repeat that must be dropped): predictions.jsonl holds each scene exactly once, in order, and
    the same greedy completions as one process decoding all 5."""
    common = ["--ckpt", init_dir, "--task", "detection", "--test-size", "5", "--frames", "2",
              "--max-new-tokens", "12", "--batch-size", "2"]
    torchrun(2, [*common, "--out", str(tmp_path / "two")], tmp_path, script="eval.py")
    evaluation.main([*common, "--out", str(tmp_path / "one")])
    read = lambda d: [json.loads(x)
                      for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
    two, one = read("two"), read("one")
    assert [r["index"] for r in two] == [0, 1, 2, 3, 4]
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
    assert json.loads((tmp_path / "two/metrics.json").read_text())["n"] == 5


def test_sampled_evaluation_at_a_vanishing_temperature_is_greedy(init_dir):
    """eval.evaluate(samples=n): n records per scene, ordered by (scene, sample), decoded from the
    prompt repeated n times. At T = 1e-5 the tempered distribution puts all its mass on the argmax,
    so every sample is the greedy completion; at T = 1 the samples differ from each other."""
    net, tok = checkpoints.load_pretrained(init_dir)
    test = scenes.SyntheticDataset("detection", 3, seed=2, frames=2)
    greedy = evaluation.evaluate(net, tok, "detection", test, max_new_tokens=12)["records"]
    torch.manual_seed(0)
    cold = evaluation.evaluate(net, tok, "detection", test, max_new_tokens=12, samples=4,
                               temperature=1e-5, batch_size=5)["records"]
    assert [(r["index"], r["sample"]) for r in cold] == [(i, j) for i in range(3) for j in range(4)]
    assert [r["completion"] for r in cold] == [g["completion"] for g in greedy for _ in range(4)]
    hot = evaluation.evaluate(net, tok, "detection", test, max_new_tokens=12, samples=4)["records"]
    assert len({r["completion"] for r in hot}) > 3


def test_eval_command_samples(init_dir, tmp_path):
    """eval.py --samples 3: three records per scene in predictions.jsonl, metrics over all nine."""
    evaluation.main(["--ckpt", init_dir, "--test-size", "3", "--frames", "2", "--max-new-tokens",
                     "8", "--samples", "3", "--temperature", "0.7", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(3)]
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 9
    with pytest.raises(SystemExit):
        evaluation.main(["--ckpt", init_dir, "--samples", "-1"])


def test_eval_command_scores_a_shifted_world(init_dir, tmp_path):
    """eval.py's world flags (bench.py's shifted test worlds): the test scenes are drawn with the
    given pitch, objects and frames (checked against the scenes drawn directly), and metrics.json
    says which world it scored."""
    world = dict(frames=3, pitch=15.0, max_objects=2)
    evaluation.main(["--ckpt", init_dir, "--test-size", "8", "--frames", "3", "--pitch", "15",
                     "--max-objects", "2", "--max-new-tokens", "8", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    drawn = scenes.SyntheticDataset("detection", 8, seed=2, **world)
    assert [r["n_gt"] for r in rows] == [len(s.boxes) for s in drawn]
    assert {len(s.boxes) for s in drawn} == {1, 2} and all(len(s.frames) == 3 for s in drawn)
    report = json.loads((tmp_path / "metrics.json").read_text())["data"][0]
    assert {k: report[k] for k in world} == world


def test_eval_samples_are_seeded_per_rank(init_dir, tmp_path):
    """eval.py --samples --seed 3 under torchrun: rank r draws from seed 3 + r (unseeded, every rank
    drew torch's one default stream), so each rank's samples equal an in-process evaluation of its
    scene after torch.manual_seed(3 + r); --viz writes one PNG per sample, not one per scene."""
    torchrun(2, ["--ckpt", init_dir, "--task", "detection", "--test-size", "2", "--frames", "2",
                 "--max-new-tokens", "10", "--samples", "2", "--batch-size", "2", "--viz", "4",
                 "--seed", "3", "--out", str(tmp_path)], tmp_path, script="eval.py")
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    net, tok = checkpoints.load_pretrained(init_dir)
    test = scenes.SyntheticDataset("detection", 2, seed=2, frames=2)
    for rank in (0, 1):  # scene r is rank r's shard
        torch.manual_seed(3 + rank)
        alone = evaluation.evaluate(net, tok, "detection", [test[rank]], max_new_tokens=10,
                                    samples=2, batch_size=2)["records"]
        assert [r["completion"] for r in rows if r["index"] == rank] == [
            r["completion"] for r in alone], rank
    assert len(list(tmp_path.glob("viz-*.png"))) == 4


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
