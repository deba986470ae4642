"""rft3d.py: prompts are VG-LLM's, SFT targets earn the maximal reward, records never raise."""
import json
import math

import numpy as np
import pytest

import data
import rft3d
import scenes


DET = ("Detect the 3D bounding boxes in the camera coordinate system of the first frame.",
       'Output a json list where each entry contains the object name in "label" and its 3D '
       'bounding box in "bbox_3d".',
       "The 3D bounding box format should be "
       "[x_center, y_center, z_center, x_size, y_size, z_size, yaw, roll, pitch].")
GROUND = ("Localize the first clear frame in the video showing the object described in the text.",
          'Output a JSON dictionary with the frame index in "frame" and its 3D bounding box in '
          '"bbox_3d" in the '
          "frame's coordinates.")


def samples(task, n=8, **kw):
    return list(scenes.SyntheticDataset(task, n, seed=21, **kw))


def test_task_table():
    assert set(rft3d.TASKS) == {"detection", "grounding", "spatial"}
    for t in rft3d.TASKS.values():
        assert t._fields == ("prompt", "target", "reward", "record") and all(map(callable, t))


@pytest.mark.parametrize("frames", [1, 4, 6])
def test_detection_prompt(frames):
    s = samples("detection", 1, frames=frames)[0]
    p = rft3d.TASKS["detection"].prompt(s, think=False)
    assert p == "<image>\n" * frames + "\n".join(DET)   # VG-LLM's training text, newlines included
    pt = rft3d.TASKS["detection"].prompt(s, think=True)
    assert pt.startswith(p) and "<think>" in pt[len(p):] and "<answer>" in pt[len(p):]


def test_grounding_prompt():
    s = samples("grounding", 1, frames=5)[0]
    p = rft3d.TASKS["grounding"].prompt(s, think=False)
    frames = "Frame-0: <image>Frame-1: <image>Frame-2: <image>Frame-3: <image>Frame-4: <image>"
    assert p == f"{frames}\n{GROUND[0]}\nText: {s.description}\n{GROUND[1]}\n"
    assert p.count("<image>") == 5 and "<think>" in rft3d.TASKS["grounding"].prompt(s, think=True)


def test_spatial_prompt():
    for s in samples("spatial", 12):
        p = rft3d.TASKS["spatial"].prompt(s, think=False)
        assert p.count("<image>") == len(s.frames)
        text = p.replace("<image>", "")
        if s.options:
            assert text == ("These are frames of a video.\n" + s.question + "\nOptions:\n"
                            + "\n".join(s.options)
                            + "\nAnswer with the option's letter from the given choices directly.")
        else:
            assert text == ("These are frames of a video.\n" + s.question
                            + "\nPlease answer the question using a single word or phrase.")


@pytest.mark.parametrize("task", ["detection", "grounding", "spatial"])
def test_sft_target_earns_the_maximal_reward(task):
    T = rft3d.TASKS[task]
    for s in samples(task, 12, min_objects=2):
        target = T.target(s)
        assert target.startswith("<think>") and target.endswith("</answer>")
        r = T.reward(s, target)
        assert r["format"] == 1.0
        if task == "detection":
            assert r["f1"] == 1.0 and r["iou"] > 0.85, r   # boxes rounded to 2 decimals
            assert T.reward(s, target, iou_mode="robust")["iou"] > 0.85
        elif task == "grounding":
            assert r["frame"] == 1.0 and r["iou"] > 0.85, r
        else:
            assert r["accuracy"] == 1.0
        assert math.isfinite(r["total"])


def test_target_numbers_have_two_decimals():
    s = samples("detection", 1, min_objects=3)[0]
    answer = rft3d.TASKS["detection"].target(s).split("<answer>")[1].split("</answer>")[0]
    boxes = json.loads(answer)
    assert [b["label"] for b in boxes] == [b["label"] for b in s.boxes]
    nums = answer.split("[", 2)[2].split("]")[0].split(", ")
    assert all(len(x.split(".")[1]) == 2 for x in nums) and "-0.00" not in answer
    assert np.allclose([b["bbox_3d"] for b in boxes], [b["bbox_3d"] for b in s.boxes],
                       atol=0.005 + 1e-9)


def test_records():
    d = samples("detection", 1, min_objects=2)[0]
    T = rft3d.TASKS["detection"]
    rec = T.record(d, T.target(d))
    assert set(rec) >= {"counts", "n_pred", "n_gt", "iou_gt", "parsed"} and rec["parsed"]
    assert rec["n_pred"] == rec["n_gt"] == len(d.boxes) and rec["iou_gt"] > 0.85
    assert sum(c[0] for c in rec["counts"]["0.25"].values()) == len(d.boxes)
    assert set(rec["counts"]) == {"0.25", "0.5"}
    json.dumps(rec)
    g = samples("grounding", 1)[0]
    rec = rft3d.TASKS["grounding"].record(g, rft3d.TASKS["grounding"].target(g))
    assert (rec["frame_pred"] == rec["frame_gt"] == g.target_frame and rec["iou"] > 0.85
            and rec["parsed"])
    assert rec["unique"] == g.meta["unique"]
    sp = samples("spatial", 1)[0]
    rec = rft3d.TASKS["spatial"].record(sp, rft3d.TASKS["spatial"].target(sp))
    assert rec == {"question_type": sp.question_type, "score": 1.0, "parsed": True}
    for task, s in (("detection", d), ("grounding", g), ("spatial", sp)):   # garbage never raises
        for bad in ("", "<answer>[{]</answer>", "x" * 1000, '{"frame": 1e999}', "[]"):
            r = rft3d.TASKS[task].reward(s, bad)
            assert math.isfinite(r["total"]) and r["format"] == 0.0
            json.dumps(rft3d.TASKS[task].record(s, bad))
    assert rft3d.TASKS["detection"].record(d, "[]")["parsed"] is True
    assert rft3d.TASKS["detection"].record(d, "nothing")["parsed"] is False


def test_bare_vgllm_answer_scores_task_but_not_format():
    s = samples("detection", 1, min_objects=2)[0]
    body = json.dumps([{"label": b["label"], "bbox_3d": b["bbox_3d"]} for b in s.boxes])
    r = rft3d.TASKS["detection"].reward(s, f"```json\n{body}\n```")
    assert r["format"] == 0.0 and r["f1"] == 1.0 and r["iou"] > 0.999


@pytest.mark.parametrize("task", ["detection", "grounding", "spatial"])
def test_exported_data_gives_the_same_prompts_and_targets(task, tmp_path):
    ds = scenes.SyntheticDataset(task, 3, seed=5)
    back = data.load_dataset(task, data.export_vgllm(ds, str(tmp_path)))
    T = rft3d.TASKS[task]
    for a, b in zip(ds, back):
        assert T.prompt(a, True) == T.prompt(b, True) and T.target(a) == T.target(b)
        assert T.reward(b, T.target(a)) == T.reward(a, T.target(a))


def test_rewards_and_records_are_total_on_hostile_text():
    """Eval records parse model output too: deep nesting, 1 MB of text, NaN and junk never raise."""
    hostile = ["<answer>" + "[" * 100000 + "]" * 100000 + "</answer>", "[" * 200000,
               "x" * 1_000_000, '<answer>{"frame": 1e999, "bbox_3d": [NaN, 1, 2]}</answer>',
               "<answer></answer>", "\x00\ud800"]
    for name, task in rft3d.TASKS.items():
        sample = scenes.SyntheticDataset(name, 1, seed=3)[0]
        for text in hostile:
            r = task.reward(sample, text)
            assert all(math.isfinite(v) for v in r.values()), (name, text[:20])
            rec = task.record(sample, text)
            assert json.loads(json.dumps(rec)) is not None and rec["parsed"] in (True, False)


def _unframed(n_frames=4):
    """A ScanRefer val-like grounding row: poses, a world box, no target frame
    (the field at its default)."""
    return data.Sample(id="scanrefer-val-7", task="grounding",
                       frames=np.zeros((n_frames, 4, 4, 3), np.uint8),
                       cam2global=np.stack([np.eye(4)] * n_frames),
                       world_box=[0, 0, 2, 1, 1, 1, 0, 0, 0], description="the box")


def test_grounding_row_without_a_target_frame():
    s = _unframed()
    # "no target frame" is explicit, not a -1 that reads as a frame index
    assert s.target_frame is None
    T = rft3d.TASKS["grounding"]
    # the world box seen from any (identity) camera: perfect IoU, never frame credit
    for f in range(4):
        text = (f'<think>t</think><answer>{{"frame": {f}, '
                f'"bbox_3d": [0, 0, 2, 1, 1, 1, 0, 0, 0]}}</answer>')
        for window in ("scaled", "fixed"):
            assert T.reward(s, text, frame_window=window) == pytest.approx(
                {"total": 2.0, "format": 1.0, "frame": 0.0, "iou": 1.0}), (f, window)
        rec = T.record(s, text)
        assert (rec["frame_gt"] is None and rec["frame_pred"] == f
                and rec["iou"] == pytest.approx(1.0))
        assert json.loads(json.dumps(rec))["frame_gt"] is None
    # SFT on grounding needs a target frame
    with pytest.raises(ValueError, match="scanrefer-val-7"):
        T.target(s)


def test_grounding_reward_takes_the_frame_window():
    """rft3d passes the trainer's reward_opts on: frame_window "scaled" (default,
    tau = 5 S / 32) or "fixed" (5). The sample's own frame count sets S: here 4 frames, so one
    frame off pays 0 scaled, 1 - 1/5 fixed."""
    T = rft3d.TASKS["grounding"]
    s = samples("grounding", 1, frames=4)[0]
    k = s.target_frame
    other = k + 1 if k < 3 else k - 1
    text = T.target(s).replace(f'"frame": {k},', f'"frame": {other},')
    assert json.loads(text.split("<answer>")[1].split("</answer>")[0])["frame"] == other
    assert T.reward(s, text)["frame"] == 0.0
    assert T.reward(s, text, frame_window="scaled")["frame"] == 0.0
    assert T.reward(s, text, frame_window="fixed")["frame"] == pytest.approx(0.8)
    assert T.reward(s, T.target(s), frame_window="fixed")["frame"] == 1.0
    with pytest.raises(ValueError, match="frame_window"):
        T.reward(s, text, frame_window="window")


def test_detection_iou_gt_on_an_empty_scene_agrees_with_f1():
    """A scene without objects: saying "nothing" ([]) is perfect, boxes or unparseable text are not;
    the record's iou_gt and eval's per-scene F1 say the same (1, 0, 0)."""
    import compare
    s = data.Sample(id="empty", task="detection", frames=np.zeros((2, 4, 4, 3), np.uint8), boxes=[])
    T = rft3d.TASKS["detection"]
    box = '{"label": "chair", "bbox_3d": [0, 0, 2, 1, 1, 1, 0, 0, 0]}'
    cases = [("<think>t</think><answer>[]</answer>", 1.0), ("```json\n[]\n```", 1.0),
             (f"<think>t</think><answer>[{box}]</answer>", 0.0), ("I see nothing", 0.0),
             ("<answer>[{]</answer>", 0.0)]
    records = [T.record(s, text) for text, _ in cases]
    assert [r["iou_gt"] for r in records] == [want for _, want in cases]
    per = compare.per_scene("detection", records)
    want = [1.0, 1.0, 0.0, 0.0, 0.0]
    assert per["iou_gt"].tolist() == per["f1_25"].tolist() == per["f1_50"].tolist() == want
    # the "gt" training reward agrees too
    assert ([T.reward(s, text, iou_mode="gt")["iou"] for text, _ in cases]
            == [want for _, want in cases])
