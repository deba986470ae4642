"""Tests of eval.py's metric aggregation against hand-computed numbers
(VG-LLM / ScanRefer / VSI-Bench)."""
import numpy as np
import pytest

import compare as C
import eval as E


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


def test_per_scene_and_paired_differences():
    """Per-scene detection metrics from the records (hand-computed F1 per scene), paired
    differences with the standard error of the per-scene differences (written out),
    seeds averaged per scene first."""
    import math

    import numpy as np
    records = [det_record({"chair": [2, 1, 1], "lamp": [1, 0, 0]}, {"chair": [1, 2, 2]}, 4, 4, 0.5),
               det_record({"chair": [1, 0, 2], "sofa": [0, 3, 0]}, {}, 4, 3, 0.25),
               det_record({}, {}, 0, 0, 0.0, parsed=False)]
    m = C.per_scene("detection", records)
    # scene 1: TP 3 FP 1 FN 1 -> 6/8; scene 2: TP 1 FP 3 FN 2 -> 2/7; scene 3: an empty
    # scene with an answer that does not parse -> 0 (only a said "nothing", a parsed [], is
    # perfect there, as in the reward)
    assert m["f1_25"].tolist() == pytest.approx([6 / 8, 2 / 7, 0.0])
    assert m["f1_50"].tolist() == pytest.approx([2 / 6, 1.0, 0.0])  # 0.5: scene 1 TP 1 FP 2 FN 2
    # scene 3's answer did not parse: it names no count, so it is not a right count of 0 boxes
    assert m["count"].tolist() == [1.0, 0.0, 0.0] and m["boxes"].tolist() == [4, 4, 0]
    assert m["iou_gt"].tolist() == [0.5, 0.25, 0.0] and m["parse"].tolist() == [1, 1, 0]
    a, b = np.array([0.5, 0.25, 0.0, 1.0]), np.array([0.25, 0.25, 0.5, 0.0])
    d = [0.25, 0.0, -0.5, 1.0]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3) / 2
    assert C.paired(a, b) == pytest.approx((mean, se, 3))
    # two seeds of one arm, 0.2 apart, no interaction: the error adds the spread of the seed
    # means (var 0.02, /2); Satterthwaite's dof from the two mean squares (seeds 4 x 0.02 with 1
    # dof, scenes 2 var(d) with 3)
    seeds = np.stack([a, a + 0.2])
    var_d = sum((x - mean) ** 2 for x in d) / 3
    dof = (0.08 + 2 * var_d) ** 2 / (0.08 ** 2 + (2 * var_d) ** 2 / 3)
    assert C.paired(seeds, b) == pytest.approx((mean + 0.1, math.sqrt(se ** 2 + 0.02 / 2), dof))
    # a scene where the metric is undefined (NaN: a grounding row without a target
    # frame) is left out of the pair
    assert C.paired(np.append(a, math.nan), np.append(b, 1.0)) == pytest.approx((mean, se, 3))


@pytest.mark.parametrize("mix", ["interaction", "seeds", "scenes"])
def test_paired_standard_error_and_claim_rate_over_variance_mixes(mix):
    """Monte Carlo: d[s, i] = seed_s + scene_i + interaction_si, S = 3 training seeds on the same
    N = 400 scenes, no effect. The standard deviation of the mean over many draws is the truth:
    the root mean square standard error must reach it within 15% whatever the mix (the old formula
    counted the interaction twice: 1.41x with interaction only), and claim() must call a zero
    effect "better" in at most 1% of draws (3 standard errors with the 2 degrees of freedom that
    seed-dominated noise leaves fire in ~5%: shown as the reason for the t critical value)."""
    import math

    import numpy as np
    sd_seed, sd_scene, sd_inter = {"interaction": (0, 0, 1), "seeds": (0.1, 0, 1),
                                   "scenes": (0, 1, 0.3)}[mix]
    rng = np.random.default_rng(1)
    S, N, reps = 3, 400, 1500
    d = (rng.normal(0, sd_seed, (reps, S, 1)) + rng.normal(0, sd_scene, (reps, 1, N))
         + rng.normal(0, sd_inter, (reps, S, N)))
    truth = math.sqrt(sd_seed ** 2 / S + sd_scene ** 2 / N + sd_inter ** 2 / (N * S))
    assert d.mean((1, 2)).std() == pytest.approx(truth, rel=0.06)
    out = np.array([C.paired(x, np.zeros(N)) for x in d])  # [reps, (mean, se, dof)]
    assert math.sqrt((out[:, 1] ** 2).mean()) == pytest.approx(truth, rel=0.15)
    z = out[:, 0] / out[:, 1]
    better = np.mean([zi > C.t_critical(dof) for zi, dof in zip(z, out[:, 2])])
    assert better <= 0.01
    if mix != "scenes":  # few degrees of freedom: a normal 3 SE rule would fire far too often
        assert np.mean(z > 3) > 0.02 and np.median(out[:, 2]) < 3


def test_t_critical_against_closed_forms():
    """Student's t quantiles with closed forms: 1 dof is Cauchy (tan), 2 dof is
    (2p - 1) / sqrt(2p(1 - p)); many dof is the normal's 3; the default tail is 3 normal SEs'."""
    import math
    p = 1 - 0.5 * math.erfc(3 / math.sqrt(2))  # 0.99865
    assert C.t_critical(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-3)
    assert C.t_critical(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-3)
    assert C.t_critical(1e9) == pytest.approx(3.0, abs=1e-3)
    assert 3.0 < C.t_critical(400) < C.t_critical(30) < C.t_critical(5) < C.t_critical(2)


def test_claim_follows_the_three_standard_error_rule():
    """Many degrees of freedom: 3 standard errors; few (3 seeds' worth): Student's t at the same
    tail, so 4 SE is not enough at 2 dof (k = 19.2)."""
    import math
    diff = lambda d, se, count=(0.0, 0.01, 400), f1=(0.0, 0.01, 400), dof=1e6: {
        "iou_gt": (d, se, dof), "count": count, "f1_25": f1}
    assert C.claim("detection", diff(0.031, 0.01)).startswith("better")
    assert C.claim("detection", diff(0.029, 0.01)).startswith("no claim")
    assert C.claim("detection", diff(0.04, 0.01, dof=2)).startswith("no claim")
    assert C.claim("detection", diff(0.2, 0.01, dof=2)).startswith("better")
    # lost the count guard
    assert C.claim("detection", diff(0.05, 0.01, count=(-0.02, 0.01, 400))).startswith("no claim")
    assert C.claim("detection", diff(-0.04, 0.01)).startswith("worse")
    assert C.claim("detection", diff(0.0, 0.0)).startswith("no claim")  # nothing varied
    assert C.claim("detection", diff(0.05, math.nan, dof=30)).startswith("no claim")  # undefined
    # a row that asks about another metric (bench.py's F1@0.5 row)
    f1_50 = {**diff(-0.01, 0.01), "f1_50": (0.04, 0.01, 1e6)}
    assert C.claim("detection", f1_50, main="f1_50").startswith("better: f1_50")
    assert C.claim("detection", f1_50).startswith("no claim: iou_gt")


def test_runs_reads_every_run_and_pairs_each_with_its_own_start(tmp_path, capsys):
    """compare.py runs: three main-command runs (their grpo/per_scene.json) whose GRPO is its own
    start + 0.1 IoU on every scene, while the starts differ by run: GRPO - start is +0.100 with no
    error (each run paired with its own start, not another run's), the start's range is printed."""
    import json
    rng = np.random.default_rng(0)
    dirs = []
    for k in range(3):
        start = {m: (rng.uniform(0, 1, 50) + k).tolist()
                 for m, _, _ in C.SCENE_METRICS["detection"]}
        grpo = {m: [x + 0.1 for x in v] for m, v in start.items()}
        run = {way: {"SFT start": start, "GRPO": grpo} for way in ("greedy", "sampled")}
        (tmp_path / f"r{k}" / "grpo").mkdir(parents=True)
        (tmp_path / f"r{k}" / "grpo" / "per_scene.json").write_text(json.dumps(run))
        dirs.append(str(tmp_path / f"r{k}"))
    C.across_runs(dirs)
    out = capsys.readouterr().out
    assert "3 runs of the main command (detection)" in out and "range" in out
    sampled = next(line for line in out.splitlines() if line.strip().startswith("sampled"))
    assert "+0.100 +- 0.000" in sampled
