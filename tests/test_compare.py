"""compare.py: per-scene metrics, paired statistics, the claim rule, sampled arms, curves."""
import json

import numpy as np
import pytest

import compare
import compare as C
from test_eval import det_record


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


def test_sampled_mean_and_best_of_n_per_scene():
    """compare.sampled: per-scene metrics of n samples -> their mean, and best of n: the one sample
    with the highest main metric, every metric that sample's own (2 scenes x 3 samples of a
    spatial score, written out; then the issue's detection scene: a 3-box answer at IoU 0.8 over
    GT and a 1-box answer at 0.1 is best at 0.8 with 3 boxes and the count wrong, never a mix)."""
    scores = [0.0, 1.0, 0.5, 0.2, 0.2, 0.2]
    records = [{"score": x, "parsed": True} for x in scores]
    mean, best = compare.sampled("spatial", records, 3)
    assert mean["score"].tolist() == pytest.approx([0.5, 0.2])
    assert best["score"].tolist() == [1.0, 0.2] and mean["parse"].tolist() == [1.0, 1.0]
    det = lambda n_pred, iou: {"counts": {"0.25": {}, "0.5": {}}, "n_pred": n_pred, "n_gt": 1,
                               "iou_gt": iou, "parsed": True}
    mean, best = compare.sampled("detection", [det(3, 0.8), det(1, 0.1)], 2)
    assert (best["iou_gt"][0], best["boxes"][0], best["count"][0]) == (0.8, 3.0, 0.0)
    assert mean["count"][0] == 0.5


def test_training_curves_draw_every_term(tmp_path):
    """curves.png from a metrics.jsonl with reward terms, KL, entropy, a skipped step's nulls and an
    evaluation line: the figure has the five panels and each reward term's line."""
    rows = [{"step": k, "reward": 1 + k / 10, "reward_format": 0.9, "reward_iou": 0.1 * k,
             "reward_std": 0.3, "kl": None if k == 2 else 0.01 * k, "entropy": 1.0}
            for k in range(1, 6)] + [{"step": 5, "eval/f1@0.25/micro": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(compare, "plot", lambda path, panels, **kw: drawn.extend(panels))
        compare.training_curves(tmp_path / "c.png", tmp_path / "metrics.jsonl", "f1@0.25/micro",
                                "detection", 100, smooth=2)
    titles = [t for t, _ in drawn]
    assert len(drawn) == 5 and set(drawn[1][1]) == {"format", "iou"}, titles
    assert drawn[2][1]["KL"][1] == pytest.approx([0.01, 0.01, 0.03, 0.035, 0.045])
    compare.training_curves(tmp_path / "c.png", tmp_path / "metrics.jsonl", "f1@0.25/micro",
                            "detection", 100)
    assert (tmp_path / "c.png").stat().st_size > 0
