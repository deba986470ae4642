"""compare.py: paired comparisons of trained models, the claim rule, and the plots. Not needed to
understand 3D-RFT: it turns eval records into the tables that a learning claim is read from
(DESIGN.md section 9).

Who calls it: train.py's closing table of the main command (the SFT start vs the GRPO result, and
the curves), bench.py learning (arms, seeds, knob rows), the tests. It imports nothing of rft3d:
records are plain dicts (rft3d.py's eval records) and metric logs are JSONL rows (train.py's
metrics.jsonl).

  1. per_scene (records -> reward-independent metrics per scene), paired differences with standard
     errors over test scenes and training seeds, tables
  2. claim: DESIGN.md section 9's 3-standard-error rule
  3. plots with matplotlib: the training curves of a run; the main command's closing report
     (greedy, sampled at the training temperature, best of G)
  4. across runs of the main command: `python compare.py runs DIR [DIR ...]` (their --out dirs:
     seeds, float paths, machines) pairs each run's GRPO with its own start, per scene
"""
import argparse
import json
import math
import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display (CI, servers)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def _finite(x):
    """A failed sample's value (None, nan, missing) counts as 0."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else 0.0


# --------------------------------------------------------------------------------------------------
# 1. Per-scene metrics and paired differences (DESIGN.md section 9)
# --------------------------------------------------------------------------------------------------

# per task: (key, name, scale): the metrics a learning claim is read from, per scene
SCENE_METRICS = {
    "detection": [("iou_gt", "IoU/GT box", 1), ("f1_25", "F1@0.25", 1), ("f1_50", "F1@0.5", 1),
                  ("count", "count acc", 1), ("boxes", "boxes/scene", 1), ("parse", "parse", 1)],
    "grounding": [("iou", "IoU", 1), ("acc25", "Acc@0.25", 100), ("acc50", "Acc@0.5", 100),
                  ("frame", "frame acc", 100), ("parse", "parse", 100)],
    "spatial": [("score", "score", 100), ("parse", "parse", 100)],
}


def per_scene(task_name, records):
    """eval records (rft3d.py's) -> {metric: array over scenes}, in record order. Detection F1 is
    per scene, 2TP / (2TP + FP + FN) at each threshold; an empty scene scores 1 when the answer
    says "nothing" (parsed, no boxes) and 0 for boxes or an answer that did not parse, as iou_gt
    and the training reward do; so does its count. Grounding "frame" (1 exact frame, else 0) is
    NaN for a row without a target frame (frame_gt None, ScanRefer val): undefined, not wrong; the
    array stays aligned with the scenes, and compare_table and paired() read it where defined."""
    parse = np.array([float(bool(r.get("parsed"))) for r in records])
    if task_name == "detection":
        def f1(r, thr):
            tp, fp, fn = (sum(int(c[i]) for c in r["counts"][thr].values()) for i in range(3))
            return (float(bool(r.get("parsed"))) if tp + fp + fn == 0
                    else 2 * tp / (2 * tp + fp + fn))
        return {"iou_gt": np.array([_finite(r.get("iou_gt")) for r in records]),
                "f1_25": np.array([f1(r, "0.25") for r in records]),
                "f1_50": np.array([f1(r, "0.5") for r in records]),
                "count": np.array([float(bool(r.get("parsed")) and r["n_pred"] == r["n_gt"])
                                   for r in records]),  # an unparsed answer counts nothing
                "boxes": np.array([float(r["n_pred"]) for r in records]), "parse": parse}
    if task_name == "grounding":
        iou = np.array([_finite(r.get("iou")) for r in records])
        return {"iou": iou, "acc25": (iou >= 0.25).astype(float),
                "acc50": (iou >= 0.5).astype(float),
                "frame": np.array([math.nan if r.get("frame_gt") is None
                                   else float(r.get("frame_pred") == r["frame_gt"])
                                   for r in records]),
                "parse": parse}
    return {"score": np.array([_finite(r.get("score")) for r in records]), "parse": parse}


def sampled(task_name, records, n):
    """Records of n samples per scene (eval.evaluate(samples=n), ordered by scene then sample) ->
    (mean, best): per-scene metrics averaged over the n samples (the policy GRPO optimises, at its
    temperature), and best of n (what the policy can reach): per scene the one sample with the
    highest main metric (the first of SCENE_METRICS; ties: the first such sample), every metric
    that sample's own, so a best-of-n row never mixes samples."""
    per = {k: v.reshape(-1, n) for k, v in per_scene(task_name, records).items()}  # [scenes, n]
    pick = per[SCENE_METRICS[task_name][0][0]].argmax(1)  # [scenes]
    rows = np.arange(len(pick))
    return {k: v.mean(1) for k, v in per.items()}, {k: v[rows, pick] for k, v in per.items()}


def paired(a, b):
    """Paired difference of two per-scene arrays, or of [seeds, scenes] arrays (seed s of a paired
    with seed s of b, or with b's one array) -> (mean of d = a - b, its standard error, degrees of
    freedom). One seed: the error over scenes, N - 1 degrees of freedom. S > 1 seeds: the two-way
    random-effects model d[s, i] = mu + seed_s + scene_i + interaction_si (DESIGN.md section 9),
    each variance component counted once: var(mean) = var_seed / S + var_scene / N + var_inter / NS.
    The seed means carry the first and last (their spread is var_seed + var_inter / N, estimated
    from S values); the scene means add var_scene, net of the interaction (truncated at 0). The
    degrees of freedom are Satterthwaite's for that sum: near S - 1 when the seeds' term dominates,
    which is what claim() must respect."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[None] if d.ndim == 1 else d  # [S, N]
    # scenes where a metric is undefined (NaN: grounding rows without a target frame)
    d = d[:, np.isfinite(d).all(0)]
    S, N = d.shape
    if N < 2:
        return float(d.mean()) if N else math.nan, math.nan, math.nan
    if S == 1:
        return float(d.mean()), float(math.sqrt(d.var(ddof=1) / N)), float(N - 1)
    seed_means, scene_means = d.mean(1), d.mean(0)                    # [S], [N]
    ms_seed = N * seed_means.var(ddof=1)                               # E = var_inter + N var_seed
    ms_scene = S * scene_means.var(ddof=1)                             # E = var_inter + S var_scene
    resid = d - seed_means[:, None] - scene_means[None, :] + d.mean()  # [S, N]
    ms_inter = (resid ** 2).sum() / ((S - 1) * (N - 1))                # E = var_inter
    terms = [(ms_seed, S - 1, 1.0)]                   # (mean square, its dof, its sign)
    if ms_scene > ms_inter:
        terms += [(ms_scene, N - 1, 1.0), (ms_inter, (S - 1) * (N - 1), -1.0)]
    var = sum(sign * ms for ms, _, sign in terms)     # = N S var(mean)
    if var <= 0:  # every seed's mean identical and no scene term: nothing varies
        return float(d.mean()), 0.0, float("inf")
    dof = var ** 2 / sum(ms ** 2 / k for ms, k, _ in terms)
    return float(d.mean()), float(math.sqrt(var / (N * S))), float(dof)


def t_critical(dof, tail=0.5 * math.erfc(3 / math.sqrt(2))):
    """k with P(T > k) = tail for Student's t with `dof` (fractional: Satterthwaite's) degrees of
    freedom; the default tail is that of 3 normal standard errors (0.135%), so k -> 3 for many
    degrees of freedom and grows for few (2: 19.2, 4: 6.6, 10: 4.0). The density is integrated
    numerically and bisected (no scipy)."""
    if not dof > 0:
        return math.nan
    dof = min(dof, 1e6)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def upper(k):  # P(T > k) = 1/2 - the density's integral over [0, k] (trapezoids)
        t = np.linspace(0.0, k, 4001)
        y = np.exp(log_norm - (dof + 1) / 2 * np.log1p(t * t / dof))
        return 0.5 - (y[1:] + y[:-1]).sum() * (t[1] - t[0]) / 2

    lo, hi = 0.0, 4.0
    while upper(hi) > tail:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        lo, hi = (lo, (lo + hi) / 2) if upper((lo + hi) / 2) < tail else ((lo + hi) / 2, hi)
    return (lo + hi) / 2


def fmt(value, scale, sign=False):
    v = value * scale
    if scale == 1:
        return f"{v:+.3f}" if sign else f"{v:.3f}"
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def table(header, rows):
    """Print rows of strings under a header, columns right-aligned."""
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(k) for x, k in zip(r, w))
    print(line(header) + "\n" + "  ".join("-" * k for k in w))
    for r in rows:
        print(line(r))


def compare_table(task_name, arms, base):
    """Print each arm's mean metrics over the same scenes, then each arm's paired difference to
    `base` with its standard error. arms: {name: per_scene dict, or a list of them, one per
    training seed (means over seeds; differences paired seed by seed, their error counting the
    seeds: paired)}. Returns {arm: {metric: (difference, standard error)}}."""
    metrics = SCENE_METRICS[task_name]
    arms = {name: {k: np.stack([x[k] for x in v]) if isinstance(v, list) else v[k]
                   for k, _, _ in metrics}
            for name, v in arms.items()}
    rows = [[name] + [fmt(np.nanmean(m[k]) if np.isfinite(m[k]).any() else math.nan, s)
                      for k, _, s in metrics]
            for name, m in arms.items()]
    out = {}
    for name, m in arms.items():
        if name != base:
            out[name] = {k: paired(m[k], arms[base][k]) for k, _, _ in metrics}
            rows.append([f"{name} - {base}"]
                        + [f"{fmt(out[name][k][0], s, True)} +- {fmt(out[name][k][1], s)}"
                           for k, _, s in metrics])
    table(["arm"] + [name for _, name, _ in metrics], rows)
    return out


# --------------------------------------------------------------------------------------------------
# 2. The claim rule
# --------------------------------------------------------------------------------------------------


def claim(task_name, diff, main=None):
    """DESIGN section 9's rule for a paired difference {metric: (d, se, dof)} of a trained arm
    against the best SFT model: real when d exceeds k standard errors on the main reward-independent
    metric (the first of SCENE_METRICS, or `main` where a row asks about another), k = t_critical
    (3 with many degrees of freedom, more with few seeds behind the error), with no loss of more
    than one standard error on the guards (detection: count accuracy and F1@0.25; grounding:
    frame)."""
    main = main or SCENE_METRICS[task_name][0][0]
    d, se, dof = diff[main]
    k = t_critical(dof)
    guards = {"detection": ("count", "f1_25"), "grounding": ("frame",), "spatial": ()}[task_name]
    lost = [g for g in guards if diff[g][0] < -diff[g][1]]
    if se > 0:  # z: d in standard errors
        z = d / se
    elif se == 0:  # nothing varied: the sign alone decides
        z = math.copysign(math.inf, d) if d else 0.0
    else:  # an undefined (NaN) error decides nothing
        z = math.nan
    said = f"{main} {d:+.3f} +- {se:.3f} ({z:+.1f} SE; k = {k:.1f} at {dof:.0f} dof)"
    if z > k and not lost:
        return f"better: {said}, no guard metric lost more than 1 SE"
    if z < -k:
        return f"worse: {said}"
    return f"no claim: {said}" + (f"; lost more than 1 SE on {lost}" if lost else "")


# --------------------------------------------------------------------------------------------------
# 3. Plots
# --------------------------------------------------------------------------------------------------


def plot(path, panels, xlabel="step"):
    """panels: [(title, {name: (xs, ys)})] -> a PNG of line plots stacked vertically, with axes,
    grid and legend (None or non-finite y values are left out)."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels):
        for name, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # something was drawn
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(path, metrics_jsonl, primary, task, val_size, smooth=10):
    """A GRPO run's curves.png from its metrics.jsonl: the training reward (each step and its mean
    over `smooth` steps), each reward term, KL to the reference and entropy (means over `smooth`
    steps), and the validation metric `primary` over the steps."""
    rows = [json.loads(x) for x in open(metrics_jsonl)]
    steps = [r for r in rows if "reward" in r]
    xs = [r["step"] for r in steps]
    mean = lambda key: (xs, [float(np.mean([r[key] for r in steps[max(0, i - smooth + 1):i + 1]
                                             if r.get(key) is not None] or [math.nan]))
                             for i in range(len(steps))])
    terms = sorted(k for k in (steps[0] if steps else {})
                   if k.startswith("reward_") and k not in ("reward_std", "reward_n_pred"))
    val = [r for r in rows if f"eval/{primary}" in r]
    plot(path, [(f"GRPO training reward ({task}, format + task terms)",
                 {"reward": (xs, [r["reward"] for r in steps]), f"mean of {smooth} steps":
                  mean("reward")}),
                (f"reward terms (mean of {smooth} steps)", {k[7:]: mean(k) for k in terms}),
                (f"KL to the reference (k3, per token; mean of {smooth} steps)",
                 {"KL": mean("kl")}),
                (f"entropy of the policy (per token; mean of {smooth} steps)",
                 {"entropy": mean("entropy")}),
                (f"validation {primary} ({val_size} scenes, greedy)",
                 {"GRPO": ([r["step"] for r in val], [r[f"eval/{primary}"] for r in val])})])


def closing_report(task, per, start, grpo_dir, primary, val_size):
    """The main command's closing tables (train.report): the SFT start and the GRPO result on the
    same test scenes, paired per scene, three ways: greedy (what eval reports), sampled at the
    training temperature (mean over G samples per scene: the policy GRPO optimises) and best of G
    (what that policy can reach); grpo/curves.png. One run is one training seed, so each table
    states its difference in standard errors over the test scenes and makes no claim (DESIGN.md
    section 9; bench.py learning makes claims). per: {way: {"SFT start": per_scene dict, "GRPO":
    per_scene dict}}. -> the report (train.report writes it as grpo/report.json)."""
    n = len(next(iter(per["greedy"]["GRPO"].values())))
    main = SCENE_METRICS[task][0][0]
    report = {"test_size": n, "start": str(start)}
    for way, arms in per.items():
        print(f"\n== {task}, {way}: the SFT start ({start}) vs GRPO ({grpo_dir / 'best'}), {n} "
              f"unseen test scenes, paired per scene (mean +- standard error) ==")
        diffs = compare_table(task, arms, base="SFT start")
        d, se, _ = diffs["GRPO"][main]
        print(f"GRPO - start, {main}: {d:+.3f} +- {se:.3f} ({d / se if se else 0:+.1f} standard "
              "errors over test scenes); one run, one training seed: not a claim (DESIGN.md "
              "section 9)")
        means = {a: {m: float(np.nanmean(v)) for m, v in x.items()} for a, x in arms.items()}
        report[way] = {"diffs": diffs, "means": means}
    training_curves(grpo_dir / "curves.png", grpo_dir / "metrics.jsonl", primary, task, val_size)
    return report


# --------------------------------------------------------------------------------------------------
# 4. Across runs of the main command
# --------------------------------------------------------------------------------------------------


def across_runs(dirs):
    """The main command run several times (seeds, float paths, machines): per scene, GRPO minus its
    own SFT start in each run, read from <dir>/grpo/per_scene.json (train.report); the runs are
    the training draws of paired() and claim()."""
    runs = [json.loads((Path(d) / "grpo" / "per_scene.json").read_text()) for d in dirs]
    task = next(t for t, ms in SCENE_METRICS.items()
                if set(runs[0]["greedy"]["GRPO"]) == {k for k, _, _ in ms})
    main = SCENE_METRICS[task][0]
    start = [float(np.mean(r["greedy"]["SFT start"][main[0]])) for r in runs]
    print(f"{len(runs)} runs of the main command ({task}); SFT start, greedy {main[1]}: mean "
          f"{np.mean(start):.3f}, range {min(start):.3f}-{max(start):.3f}")
    rows = []
    for way in runs[0]:
        pick = lambda arm, k: np.array([r[way][arm][k] for r in runs], float)  # [runs, scenes]
        diff = {k: paired(pick("GRPO", k), pick("SFT start", k)) for k, _, _ in SCENE_METRICS[task]}
        rows.append([way] + [f"{fmt(diff[k][0], s, True)} +- {fmt(diff[k][1], s)}"
                             for k, _, s in SCENE_METRICS[task][:4]]
                    + [f"{diff[main[0]][2]:.1f}", claim(task, diff)])
    table(["GRPO - start"] + [n for _, n, _ in SCENE_METRICS[task][:4]] + ["dof", "verdict"], rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="GRPO - its own SFT start across runs of the main "
                                            "command, with the claim rule (DESIGN.md section 9)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("runs").add_argument("dirs", nargs="+", help="--out dirs (runs/detection)")
    across_runs(p.parse_args().dirs)
