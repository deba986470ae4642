"""rft3d.py: prompts are VG-LLM's templates with one placeholder per frame, SFT targets earn the maximal reward,
records have the agreed fields and never raise."""
import json
import math

import numpy as np
import pytest

import data
import scenes
import rft3d

DET = ("Detect the 3D bounding boxes in the camera coordinate system of the first frame.",
       'Output a json list where each entry contains the object name in "label" and its 3D bounding box in "bbox_3d".',
       "The 3D bounding box format should be [x_center, y_center, z_center, x_size, y_size, z_size, yaw, roll, pitch].")
GROUND = ("Localize the first clear frame in the video showing the object described in the text.",
          'Output a JSON dictionary with the frame index in "frame" and its 3D bounding box in "bbox_3d" in the '
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
            assert text == ("These are frames of a video.\n" + s.question + "\nOptions:\n" + "\n".join(s.options)
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
    assert np.allclose([b["bbox_3d"] for b in boxes], [b["bbox_3d"] for b in s.boxes], atol=0.005 + 1e-9)


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
    assert rec["frame_pred"] == rec["frame_gt"] == g.target_frame and rec["iou"] > 0.85 and rec["parsed"]
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
    hostile = ["<answer>" + "[" * 100000 + "]" * 100000 + "</answer>", "[" * 200000, "x" * 1_000_000,
               '<answer>{"frame": 1e999, "bbox_3d": [NaN, 1, 2]}</answer>', "<answer></answer>", "\x00\ud800"]
    for name, task in rft3d.TASKS.items():
        sample = scenes.SyntheticDataset(name, 1, seed=3)[0]
        for text in hostile:
            r = task.reward(sample, text)
            assert all(math.isfinite(v) for v in r.values()), (name, text[:20])
            rec = task.record(sample, text)
            assert json.loads(json.dumps(rec)) is not None and rec["parsed"] in (True, False)
