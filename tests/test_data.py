"""data.py: real-data readers, the exporter, bad rows named, frame sampling, --data mixes."""
import hashlib
import json
import math
import os
import re
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import boxes
import data
import scenes
import train
from independent import R_zxy, same_box


# ---- export -> real readers ----------------------------------------------------------------------
def assert_same(a, b):
    assert a.id == b.id and a.task == b.task
    assert np.array_equal(a.frames, b.frames)
    assert (np.allclose(a.cam2global, b.cam2global, atol=1e-9)
            and np.allclose(a.axis_align, b.axis_align))
    assert np.allclose(a.intrinsics, b.intrinsics)
    for k in ("description", "target_frame", "question", "options", "ground_truth",
              "question_type"):
        assert getattr(a, k) == getattr(b, k), k
    assert len(a.boxes) == len(b.boxes)
    for x, y in zip(a.boxes, b.boxes):
        assert x["label"] == y["label"] and np.allclose(x["bbox_3d"], y["bbox_3d"])
    assert (np.allclose(a.target_box or [0], b.target_box or [0])
            and np.allclose(a.world_box or [0], b.world_box or [0]))


@pytest.mark.parametrize("task", data.TASK_NAMES)
def test_export_round_trip(task, tmp_path):
    ds = scenes.SyntheticDataset(task, 4, seed=2)
    path = data.export_vgllm(ds, str(tmp_path))
    back = data.load_dataset(task, path)
    assert len(back) == 4 and back.n_skipped == 0
    for i in range(4):
        assert_same(ds[i], back[i])
    if task == "grounding":
        assert back[0].meta["unique"] == ds[0].meta["unique"]
    if task != "spatial":
        row = json.load(open(path))[0]
        assert (row["conversations"][0]["value"].count("<image>") == 4
                and row["conversations"][1]["from"] == "gpt")


def test_export_round_trip_of_a_grounding_row_without_a_target_frame(tmp_path):
    """A row without a target frame (ScanRefer val) is exported with "target": null, read back
    without one."""
    ds = list(scenes.SyntheticDataset("grounding", 2, seed=2))
    ds[1].target_frame, ds[1].target_box = None, []
    path = data.export_vgllm(ds, str(tmp_path))
    rows = json.load(open(path))
    assert rows[0]["target"]["frame"] == ds[0].target_frame and rows[1]["target"] is None
    back = data.load_dataset("grounding", path)
    assert back[0].target_frame == ds[0].target_frame and back[1].target_frame is None
    assert_same(ds[1], back[1])
    assert back.report["no_target_frame"] == 1


def test_draw_boxes_two_colours():
    s = scenes.SyntheticDataset("detection", 1, seed=0)[0]
    pred = [dict(b, bbox_3d=list(np.add(b["bbox_3d"], [0.2, 0, 0, 0, 0, 0, 0, 0, 0])))
            for b in s.boxes]
    im = np.asarray(data.draw_boxes(s.frames, s.intrinsics, s.cam2global, s.boxes, pred))
    assert im.shape == (56 * 4, 4 * 56 * 4, 3)
    for col in ((60, 255, 60), (255, 60, 255)):
        assert (im == col).all(-1).sum() > 50


# ---- fixtures in the real layouts, written here --------------------------------------------------
def write_images(root, rel_paths, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for p in rel_paths:
        os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(root, p))


def pose(t):
    T = np.eye(4)
    T[:3, :3] = R_zxy(t, -1.9, 0.1)
    T[:3, 3] = [t, 2 * t, 1.5]
    return T


def test_vgllm_detection_fixture(tmp_path):
    media = tmp_path / "media"
    imgs = [f"scannet/posed_images/scene0000_00/{k:05d}.jpg" for k in (0, 10, 20, 30)]
    write_images(media, imgs)
    row = {"conversations": [{"from": "human", "value": "<image>\n" * 4 + data.DET_TEXT},
                             {"from": "gpt", "value": "```json\n[]```"}],
           "images": imgs,
           "boxes": [{"bbox_3d": [0.1, 0.2, 2.0, 0.5, 0.5, 0.9, 0.1, -0.2, 0.3], "label": "chair"}],
           "cam2img": [[577.0, 0, 319.5, 0], [0, 578.0, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
           "cam2global": [pose(k).tolist() for k in range(4)],
           "axis_align_matrix": np.eye(4).tolist()}
    path = tmp_path / "scannet_det_val_4frames.json"
    path.write_text(
        json.dumps([row, {k: v for k, v in row.items() if k not in ("cam2global", "cam2img")}]))
    ds = data.load_dataset("detection", str(path), media_root=str(media))
    s = ds[0]
    assert (s.frames.shape == (4, 30, 40, 3) and s.boxes[0]["label"] == "chair"
            and s.intrinsics[0, 0] == 577)
    assert np.allclose(s.cam2global[1], pose(1)) and ds[1].cam2global is None
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=data.collate)
    assert [np.array_equal(a.frames, b.frames)
            for a, b in zip(next(iter(loader)), ds)] == [True, True]
    # linspace(0, 3, 2)
    s2 = data.load_dataset("detection", str(path), media_root=str(media), frames=2)[0]
    assert len(s2.frames) == 2 and np.allclose(s2.cam2global[1], pose(3))


def test_scanrefer_fixture(tmp_path):
    media = tmp_path / "media"
    imgs = [f"scannet/posed_images/scene0011_00/{k:05d}.jpg" for k in range(0, 60, 10)]
    write_images(media, imgs)
    A = np.eye(4)
    A[:3, :3] = R_zxy(0.5, 0, 0)
    A[:3, 3] = [1, -2, 0.1]
    world = [1.0, 2.0, 0.5, 0.6, 0.4, 1.0, 0, 0, 0]
    tokens = "".join(f"Frame-{k}: <image>" for k in range(6))
    prompt = data.GROUND_TEXT.format("This is a brown chair. it is next to the table.")
    base = {"images": imgs, "gt_bbox": world, "prompt": prompt,
            "cam2global": [pose(k).tolist() for k in range(6)],
            "axis_align_matrix": A.tolist(), "cam2img": np.eye(4).tolist(),
            "conversations": [{"value": f"{tokens}\n{prompt}", "from": "human"},
                              {"value": "", "from": "gpt"}]}
    target_box = boxes.box_to_world(world, np.linalg.inv(A @ pose(4)))
    rows = [dict(base, metadata={"dataset": "scanrefer", "question_type": "multiple", "ann_id": "0",
                                 "object_id": "7"}, target={"frame": 4, "bbox_3d": target_box}),
            dict(base, metadata={"dataset": "scanrefer", "question_type": "unique", "ann_id": "1",
                                 "object_id": "3"}, target=None)]
    path = tmp_path / "scanrefer_val_6frames.json"
    path.write_text(json.dumps(rows))
    ds = data.load_dataset("grounding", str(path), media_root=str(media))
    s, v = ds[0], ds[1]
    assert s.description == "This is a brown chair. it is next to the table."
    assert (ds.report["no_target_frame"] == 1
            and "1 without a target frame" in data.describe(ds.report))
    assert (s.target_frame == 4 and np.allclose(s.target_box, target_box)
            and s.meta["unique"] is False)
    assert v.target_frame is None and v.meta["unique"] is True and np.allclose(v.world_box, world)
    # frames 0, 2(.5->2), 5
    sub = data.load_dataset("grounding", str(path), media_root=str(media), frames=3)[0]
    # frame 4 -> the nearest kept frame (index 5)
    assert sub.target_frame == 2 and len(sub.frames) == 3
    E = A @ sub.cam2global[2]
    assert same_box(boxes.box_to_world(sub.target_box, E), world)


def test_scannet_posed_folder_skips_bad_poses(tmp_path):
    folder = tmp_path / "scene0000_00"
    write_images(folder, [f"{k:05d}.jpg" for k in range(0, 100, 10)])
    # depth maps: ignored
    write_images(folder, [f"{k:05d}.png" for k in range(0, 100, 10)], size=(8, 6))
    for k in range(0, 100, 10):
        m = pose(k / 100)
        if k == 30:
            m[0, 0] = -np.inf
        np.savetxt(folder / f"{k:05d}.txt", m)
    np.savetxt(folder / "intrinsic.txt", np.diag([500.0, 500.0, 1.0, 1.0]))
    frames, c2g, K, names = data.read_posed_folder(str(folder), 4)
    valid = [f"{k:05d}.jpg" for k in range(0, 100, 10) if k != 30]   # 9 frames
    # linspace(0, 8, 4) = 0, 2.67, 5.33, 8, floored (VG-LLM)
    assert names == [valid[i] for i in (0, 2, 5, 8)]
    assert frames.shape == (4, 30, 40, 3) and np.all(np.isfinite(c2g)) and K[0, 0] == 500
    assert np.allclose(c2g[1], pose(0.2))


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_vsibench_fixture(tmp_path, fmt):
    folder = tmp_path / "media" / "scannet" / "scene0011_00"
    write_images(folder, [f"{k:05d}.png" for k in range(20)])
    rows = [{"id": 1, "dataset": "scannet", "scene_name": "scene0011_00",
             "question_type": "object_counting",
             "question": "How many chair(s) are in this room?", "options": None,
             "ground_truth": "4"},
            {"id": 2, "dataset": "scannet", "scene_name": "scene0011_00",
             "question_type": "object_rel_direction_easy",
             "question": "If I am standing by the sofa and facing the tv, is the lamp to the left "
                         "or the right of the tv?",
             "options": ["A. left", "B. right"], "ground_truth": "B"}]
    path = tmp_path / f"vsibench.{fmt}"
    path.write_text("\n".join(map(json.dumps, rows)) if fmt == "jsonl" else json.dumps(rows))
    ds = data.load_dataset("spatial", str(path), frames=8)
    a, b = ds[0], ds[1]
    assert (a.frames.shape == (8, 30, 40, 3) and a.ground_truth == "4" and a.options == []
            and a.id == "1")
    assert b.options == ["A. left", "B. right"] and b.question_type == "object_rel_direction_easy"
    assert a.cam2global is None


VSI_ROW = {"id": 7, "dataset": "arkitscenes", "scene_name": "41069025",
           "question_type": "room_size_estimation",
           "question": "What is the size of this room (in square meters)?", "options": None,
           "ground_truth": "23.6"}


def test_vsibench_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")   # optional: data.py imports it lazily
    import pyarrow.parquet as pq
    write_images(tmp_path / "arkitscenes" / "41069025", [f"{k:05d}.jpg" for k in range(5)])
    pq.write_table(pa.Table.from_pylist([VSI_ROW]), tmp_path / "test.parquet")
    s = data.load_dataset("spatial", str(tmp_path / "test.parquet"), media_root=str(tmp_path),
                          frames=3)[0]
    assert s.ground_truth == "23.6" and s.options == [] and len(s.frames) == 3


def test_vsibench_video(tmp_path):
    av = pytest.importorskip("av")   # optional: data.py imports it lazily
    os.makedirs(tmp_path / "arkitscenes")
    with av.open(str(tmp_path / "arkitscenes" / "41069025.mp4"), "w") as c:
        st = c.add_stream("mpeg4", rate=10)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        # frame i is a flat grey of level 8 * i: the sampled indices can be read back
        for i in range(30):
            fr = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")
            c.mux(st.encode(fr))
        c.mux(st.encode())
    (tmp_path / "vsi.json").write_text(json.dumps([VSI_ROW]))
    s = data.load_dataset("spatial", str(tmp_path / "vsi.json"), media_root=str(tmp_path),
                          frames=4)[0]
    assert s.frames.shape == (4, 48, 64, 3)
    levels = s.frames.reshape(4, -1).mean(1) / 8
    # linspace(0, 29, 4) = 0, 9.67, 19.33, 29, floored
    assert np.allclose(levels, [0, 9, 19, 29], atol=0.4)
    # found when opened
    (tmp_path / "arkitscenes" / "41069025.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match=r"vsi.json: row 0: .*cannot open video .*41069025.mp4"):
        data.load_dataset("spatial", str(tmp_path / "vsi.json"), media_root=str(tmp_path), frames=4)


# ---- bad files and bad rows: errors name the file (and row); skip_bad lists rows with reasons ----
GOOD_BOX = [0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_bad_rows_raise_with_file_and_row_or_are_counted(tmp_path):
    media = tmp_path / "media"
    write_images(media, ["a/00000.jpg"])
    good = {"images": ["a/00000.jpg"], "boxes": [{"label": "chair", "bbox_3d": GOOD_BOX}],
            "conversations": []}
    rows = [good, dict(good, boxes=[{"label": "chair", "bbox_3d": [0] * 8}]),   # 8 numbers
            {k: v for k, v in good.items() if k != "boxes"},                     # no boxes
            dict(good, images=["a/missing.jpg"]),                                # missing file
            # wrong-shaped pose, a string
            dict(good, cam2global=[[[1.0] * 4] * 3]), "not a row", good]
    path = tmp_path / "det.json"
    path.write_text(json.dumps(rows))
    for bad, what in ((1, "9 finite numbers"), (2, "boxes"), (3, "missing.jpg")):
        p = tmp_path / f"det{bad}.json"
        p.write_text(json.dumps([good, rows[bad]]))
        with pytest.raises(ValueError, match=rf"{re.escape(str(p))}: row 1: .*{what}"):
            data.load_dataset("detection", str(p), media_root=str(media))
    ds = data.load_dataset("detection", str(path), media_root=str(media), skip_bad=True)
    assert len(ds) == 2 and ds.n_skipped == 5 and ds[1].id == "det.json:6"
    skipped = ds.report["skipped_rows"]
    assert [s["row"] for s in skipped] == [1, 2, 3, 4, 5]
    assert "9 finite numbers" in skipped[0]["reason"] and "missing.jpg" in skipped[2]["reason"]
    assert "cam2global" in skipped[3]["reason"] and "not an object" in skipped[4]["reason"]
    # a corrupt image is found when read: the error still names the file and the row
    (media / "a" / "00000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"det.json: row 0: cannot read"):
        ds[0]
    # JSONL: a line that is not JSON; VSI: a missing video; nothing left
    # is an error even with skip_bad
    p = tmp_path / "vsi.jsonl"
    p.write_text('{"id": 0}\nnot json\n'
                 + json.dumps({"dataset": "arkitscenes", "scene_name": "41069025",
                               "question_type": "room_size_estimation", "question": "q",
                               "ground_truth": "20"})
                 + "\n")
    with pytest.raises(ValueError, match=r"vsi.jsonl: row 0: .*dataset"):
        data.load_dataset("spatial", str(p), media_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"vsi.jsonl: no usable rows; all 3 rows are bad, "
                                         r"e.g. row 0: .*dataset"):
        data.load_dataset("spatial", str(p), media_root=str(tmp_path), skip_bad=True)
    p.write_text(p.read_text().splitlines()[-1])
    with pytest.raises(ValueError, match=r"vsi.jsonl: row 0: .*arkitscenes/41069025.mp4"):
        data.load_dataset("spatial", str(p), media_root=str(tmp_path))


def test_missing_optional_packages_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)        # as if PyAV were not installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    os.makedirs(tmp_path / "arkitscenes")
    (tmp_path / "arkitscenes" / "41069025.mp4").write_bytes(b"")
    (tmp_path / "vsi.json").write_text(json.dumps([VSI_ROW]))
    # when the file is opened, not at step 1
    with pytest.raises(ImportError, match="pip install av"):
        data.load_dataset("spatial", str(tmp_path / "vsi.json"), media_root=str(tmp_path))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        data.load_dataset("spatial", str(tmp_path / "x.parquet"))


def test_file_level_errors_name_the_file(tmp_path):
    ds = scenes.SyntheticDataset("detection", 3, seed=4)
    path = data.export_vgllm(ds, str(tmp_path))
    text = open(path).read()
    cases = {"": "the file is empty", "  \n": "the file is empty",
             text[: len(text) // 2]: "not valid JSON",
             '{"rows": []}': "expected a JSON list of rows, got an object", "[]": "no usable rows",
             "\xff\xfe[]": "not UTF-8"}
    for content, what in cases.items():
        with open(path, "wb") as f:
            f.write(content.encode("latin-1"))
        with pytest.raises(ValueError, match=re.escape(path) + ": " + re.escape(what)) as e:
            data.load_dataset("detection", path)
        assert type(e.value) is data.DataError   # not a bare JSONDecodeError
    with pytest.raises(ValueError,
                       match=re.escape(str(tmp_path / "nope.json")) + ": cannot read the file"):
        data.load_dataset("detection", str(tmp_path / "nope.json"))


@pytest.mark.parametrize("task", data.TASK_NAMES)
def test_task_is_checked_against_the_file(task, tmp_path):
    path = data.export_vgllm(scenes.SyntheticDataset(task, 2, seed=4), str(tmp_path))
    for other in data.TASK_NAMES:
        if other != task:
            with pytest.raises(ValueError, match=rf"{re.escape(path)}: this looks like a {task} "
                                                 rf"file .* not {other}"):
                data.load_dataset(other, path)


def _vsi_rows(tmp_path):
    write_images(tmp_path / "media" / "scannet" / "s0", ["00000.jpg", "00001.jpg"])
    mc = {"id": 1, "dataset": "scannet", "scene_name": "s0",
          "question_type": "object_rel_direction_easy",
          "question": "left or right?", "options": ["A. left", "B. right"], "ground_truth": "B"}
    num = {"id": 2, "dataset": "scannet", "scene_name": "s0", "question_type": "object_counting",
           "question": "How many chairs?", "options": None, "ground_truth": "4"}
    return mc, num


def _grounding_row(tmp_path):
    write_images(tmp_path / "media", [f"scannet/posed_images/s0/{k:05d}.jpg" for k in range(3)])
    return {"images": [f"scannet/posed_images/s0/{k:05d}.jpg" for k in range(3)],
            "gt_bbox": GOOD_BOX, "prompt": data.GROUND_TEXT.format("the chair"),
            "cam2global": [pose(k).tolist() for k in range(3)],
            "target": {"frame": 1, "bbox_3d": GOOD_BOX}, "metadata": {"question_type": "unique"}}


def _detection_row(tmp_path):
    write_images(tmp_path / "media",
                 ["scannet/posed_images/s0/00000.jpg", "scannet/posed_images/s0/00001.jpg"])
    return {"images": ["scannet/posed_images/s0/00000.jpg", "scannet/posed_images/s0/00001.jpg"],
            "boxes": [{"label": "chair", "bbox_3d": GOOD_BOX}],
            "cam2global": [pose(k).tolist() for k in range(2)]}


# (task, how the good row is spoiled, what the message says): each was silently accepted before
BAD_VALUES = [
    ("spatial", lambda r: dict(r[0], options="A. left"), "one string"),
    ("spatial", lambda r: dict(r[0], ground_truth="C"), "not one of the options' letters"),
    # MC without options
    ("spatial", lambda r: dict(r[0], options=None), "not one of the options' letters"),
    ("spatial", lambda r: dict(r[1], ground_truth="about four"), "not a number"),
    ("spatial", lambda r: dict(r[1], ground_truth="0"), "positive number"),
    ("spatial", lambda r: dict(r[1], ground_truth=True), "'ground_truth' is true"),
    ("spatial", lambda r: dict(r[1], options=["A. 3", "B. 4"]),
     "answered with a number, but the row has options"),
    ("detection", lambda r: dict(r, boxes=[{"label": "chair", "bbox_3d": [True] + GOOD_BOX[1:]}]),
     "9 finite numbers"),
    ("detection",
     lambda r: dict(r, boxes=[{"label": "chair", "bbox_3d": GOOD_BOX[:3] + [1, -1, 1, 0, 0, 0]}]),
     "positive sizes"),
    ("detection", lambda r: dict(r, boxes=[{"label": None, "bbox_3d": GOOD_BOX}]),
     "label must be a non-empty string"),
    ("detection", lambda r: dict(r, cam2global=[[[True, 0, 0, 0]] + pose(0).tolist()[1:]] * 2),
     "true/false"),
    ("grounding", lambda r: dict(r, target={"frame": True, "bbox_3d": GOOD_BOX}),
     "target frame must be an int"),
    ("grounding", lambda r: dict(r, gt_bbox=GOOD_BOX[:3] + [0, 1, 1, 0, 0, 0]),
     "gt_bbox must have positive sizes"),
]


@pytest.mark.parametrize("task,spoil,what", BAD_VALUES)
def test_silently_accepted_values_are_rejected_with_the_row(task, spoil, what, tmp_path):
    good = {"spatial": _vsi_rows, "grounding": _grounding_row,
            "detection": _detection_row}[task](tmp_path)
    first = good[0] if task == "spatial" else good
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([first, spoil(good)]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: row 1: .*{re.escape(what)}"):
        data.load_dataset(task, str(path), media_root=str(tmp_path / "media"))
    ds = data.load_dataset(task, str(path), media_root=str(tmp_path / "media"), skip_bad=True)
    assert (len(ds) == 1 and ds.report["skipped_rows"][0]["row"] == 1
            and what in ds.report["skipped_rows"][0]["reason"])
    path.write_text(json.dumps([first, first]))   # and the good rows pass
    assert len(data.load_dataset(task, str(path), media_root=str(tmp_path / "media"))) == 2


def test_media_are_checked_when_the_file_is_opened(tmp_path):
    row = _detection_row(tmp_path)
    media = tmp_path / "media"
    write_images(media, ["scannet/posed_images/s1/00000.jpg"], size=(40, 30))
    write_images(media, ["scannet/posed_images/s1/00001.jpg"], size=(20, 30))
    (media / "scannet/posed_images/s2").mkdir(parents=True)
    (media / "scannet/posed_images/s2/00000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    write_images(media, ["scannet/posed_images/s2/00001.jpg"])
    rows = [row, dict(row, images=["scannet/posed_images/s1/00000.jpg",
                                   "scannet/posed_images/s1/00001.jpg"]),
            dict(row, images=["scannet/posed_images/s2/00000.jpg",
                              "scannet/posed_images/s2/00001.jpg"])]
    path = tmp_path / "det.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError,
                       match=r"det.json: row 1: .*frames differ in size: .*is 40x30, .*is 20x30"):
        data.load_dataset("detection", str(path), media_root=str(media))
    ds = data.load_dataset("detection", str(path), media_root=str(media), skip_bad=True)
    reasons = {s["row"]: s["reason"] for s in ds.report["skipped_rows"]}
    assert (set(reasons) == {1, 2} and "cannot read image" in reasons[2]
            and "s2/00000.jpg" in reasons[2])
    # a truncated jpeg: its header reads, its pixels do not; the first row
    # is decoded in full when opened
    jpg = media / "scannet/posed_images/s0/00000.jpg"
    jpg.write_bytes(jpg.read_bytes()[: -len(jpg.read_bytes()) // 3])
    with pytest.raises(ValueError, match=r"det.json: row 0: cannot read media"):
        data.load_dataset("detection", str(path), media_root=str(media), skip_bad=True)
    # VSI-Bench frame folders: a folder without frames
    mc, _ = _vsi_rows(tmp_path)
    (tmp_path / "media" / "scannet" / "empty").mkdir()
    path = tmp_path / "vsi.json"
    path.write_text(json.dumps([mc, dict(mc, scene_name="empty")]))
    with pytest.raises(ValueError, match=r"vsi.json: row 1: .*has no frames"):
        data.load_dataset("spatial", str(path), media_root=str(tmp_path / "media"))


def test_report_says_what_was_read(tmp_path):
    ds = scenes.SyntheticDataset("spatial", 6, seed=4)
    path = data.export_vgllm(ds, str(tmp_path))
    with open(path, "a") as f:
        f.write('{"not": "a row"}\n')
    back = data.load_dataset("spatial", path, skip_bad=True)
    r = back.report
    # of the bytes on disk
    assert r["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert (r["rows"], r["kept"], r["skipped"]) == (7, 6, 1) and r["skipped_rows"][0]["row"] == 6
    types = [ds[i].question_type for i in range(6)]
    assert (r["by_type"] == {t: types.count(t) for t in set(types)}
            and r["path"] == os.path.abspath(path))
    text = data.describe(r)
    assert (path in text and r["sha256"][:16] in text and "7 rows, 6 used" in text
            and "row 6:" in text)
    json.dumps(r)   # stored with the run as JSON


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
