"""rft3d.py: the task layer of 3D-RFT. Per task: sample -> prompt, sample -> SFT target,
completion -> reward (the task's metric, rewards.py), completion -> eval record (eval.py sums them).

Prompts are VG-LLM's training templates word for word (DESIGN.md section 3); think=True adds our one
sentence asking for <think>...</think><answer>...</answer>. A record's keyword options are where the
public evaluators' quirks plug in (published.RECORD_OPTS, eval.py --protocol published).

Adding a fourth task: its four functions below, samples with task="yourtask" (scenes.py or a reader
in data.py), and one line in TASKS at the bottom. Nothing else dispatches on tasks.
"""
import json
import math
from typing import Callable, NamedTuple

import numpy as np

import boxes
import rewards
from data import DET_TEXT, GROUND_TEXT, Sample  # VG-LLM's instruction texts live by the exporter

IMAGE_PLACEHOLDER = "<image>"
THINK = ("First think briefly inside <think> </think>, then give the final answer inside "
         "<answer> </answer>.")
VSI_PRE = "These are frames of a video."
VSI_MC = "Answer with the option's letter from the given choices directly."
VSI_NUM = "Please answer the question using a single word or phrase."


class Task(NamedTuple):
    prompt: Callable    # (sample, think: bool) -> user text with one "<image>" per frame
    target: Callable    # sample -> "<think>...</think><answer>...</answer>" (SFT)
    reward: Callable    # (sample, completion, **opts) -> {"total": float, components...}
    record: Callable    # (sample, completion, **opts) -> JSON-serialisable eval record


def _num(x):
    """A number at 2 decimals, never "-0.00" (one spelling per value is easier to learn)."""
    s = f"{float(x):.2f}"
    return "0.00" if s == "-0.00" else s


def _box(box):
    return "[" + ", ".join(_num(x) for x in box) + "]"


def _with_think(text, think):
    return (text if text.endswith("\n") else text + "\n") + THINK if think else text


def _sft(think, answer):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---- 1. detection: 9-DoF boxes in frame 0's camera coordinates, reward = format + IoU + F1 -------
def detection_prompt(s: Sample, think=False):
    return _with_think(f"{IMAGE_PLACEHOLDER}\n" * len(s.frames) + DET_TEXT, think)


def detection_target(s: Sample):
    labels = [b["label"] for b in s.boxes]
    seen = (f"I see {len(labels)} object{'s' if len(labels) != 1 else ''}: {', '.join(labels)}."
            if labels else "I see no objects.")
    listed = ", ".join(f'{{"label": {json.dumps(b["label"])}, "bbox_3d": {_box(b["bbox_3d"])}}}'
                       for b in s.boxes)
    return _sft(seen, f"[{listed}]")


def detection_reward(s: Sample, completion, iou_mode="paper", f1_iou=rewards.MATCH_IOU, **_):
    return rewards.detection_reward(completion, s.boxes, iou_mode=iou_mode, f1_iou=f1_iou)


def detection_record(s: Sample, completion, max_boxes=rewards.MAX_BOXES):
    pred = rewards.parse_detections(completion, max_boxes)
    parsed = rewards.answered_list(completion, pred)  # a JSON list, [] included ("nothing here")
    return {"counts": {str(t): rewards.match_by_label(pred, s.boxes, t) for t in (0.25, 0.5)},
            "n_pred": len(pred), "n_gt": len(s.boxes),
            "iou_gt": rewards.gt_iou(pred, s.boxes, parsed), "parsed": parsed}


# ---- 2. grounding: frame index + box in its camera, reward = format + frame + IoU (world) --------
def grounding_prompt(s: Sample, think=False):
    frames = "".join(f"Frame-{k}: {IMAGE_PLACEHOLDER}" for k in range(len(s.frames)))
    return _with_think(f"{frames}\n" + GROUND_TEXT.format(s.description), think)


def grounding_target(s: Sample):
    """The target frame and the box in its camera; a row without a frame is a ValueError."""
    if s.target_frame is None:
        raise ValueError(f"sample {s.id}: grounding SFT needs a target frame and this row has none "
                         "(ScanRefer val rows have only the world box): train on rows with a "
                         "'target'")
    what = f"the {s.meta['label']}" if s.meta.get("label") else "the object"
    answer = f'{{"frame": {int(s.target_frame)}, "bbox_3d": {_box(s.target_box)}}}'
    return _sft(f"The target is {what}, seen best in frame {int(s.target_frame)}.", answer)


def grounding_reward(s: Sample, completion, frame_window="scaled", **_):
    """frame_window: tau = 5 S / 32 for S = len(s.frames) frames ("scaled") or the paper's 5."""
    return rewards.grounding_reward(completion, s.world_box, s.target_frame, s.cam2global,
                                    s.axis_align, frame_window=frame_window, n_frames=len(s.frames))


def grounding_record(s: Sample, completion, to_world=boxes.box_to_world):
    """IoU in the aligned world, frames (frame_gt None: no target frame), box_world: the predicted
    box in the world (None if it cannot be), which eval.py --proposals may replace."""
    parsed, iou, world = rewards.parse_grounding(completion), 0.0, None
    if parsed is not None and s.cam2global is not None and 0 <= parsed[0] < len(s.cam2global):
        E = np.asarray(s.axis_align) @ np.asarray(s.cam2global[parsed[0]])
        with np.errstate(all="ignore"):
            world = to_world(parsed[1], E)
        world = world if all(map(math.isfinite, world)) else None
        iou = boxes.iou_3d(world, s.world_box) if world else 0.0
    return {"iou": float(iou), "frame_pred": None if parsed is None else int(parsed[0]),
            "frame_gt": None if s.target_frame is None else int(s.target_frame),
            "unique": s.meta.get("unique"), "parsed": parsed is not None, "box_world": world}


# ---- 3. spatial (VSI-Bench): option letter (exact) or number (MRA), reward = format + score ------
def spatial_prompt(s: Sample, think=False):
    text = IMAGE_PLACEHOLDER * len(s.frames) + f"{VSI_PRE}\n{s.question}"
    if s.options:   # multiple choice
        text += "\nOptions:\n" + "\n".join(s.options) + f"\n{VSI_MC}"
    else:           # a number
        text += f"\n{VSI_NUM}"
    return _with_think(text, think)


def spatial_target(s: Sample):
    labels = [o["label"] for o in s.meta.get("objects", [])]
    seen = (f"I see {len(labels)} objects: {', '.join(labels)}." if labels
            else "I look at the frames.")
    return _sft(seen, s.ground_truth)


def spatial_reward(s: Sample, completion, **_):
    return rewards.spatial_reward(completion, s.ground_truth, s.options or None)


def spatial_record(s: Sample, completion, answer=rewards.parse_spatial,
                   letter=rewards.choice_accuracy):
    score = rewards.spatial_accuracy(answer(completion), s.ground_truth, s.options, letter)
    return {"question_type": s.question_type, "score": score,
            "parsed": rewards.parse_spatial(completion) is not None}


# ---- the task table: a fourth task is one more line here -----------------------------------------
TASKS = {
    "detection": Task(detection_prompt, detection_target, detection_reward, detection_record),
    "grounding": Task(grounding_prompt, grounding_target, grounding_reward, grounding_record),
    "spatial": Task(spatial_prompt, spatial_target, spatial_reward, spatial_record),
}

# Completion length caps for generation: room for the think sentence and the longest synthetic
# answer in the tiny tokenizer (3 boxes); raise --max-new-tokens for real scenes with many objects.
MAX_NEW_TOKENS = {"detection": 256, "grounding": 96, "spatial": 48}
