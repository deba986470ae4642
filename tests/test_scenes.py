"""scenes.py: synthetic labels agree with the pixels and independent recomputations."""
import json
import math
import re

import numpy as np
import torch
from PIL import Image

import boxes
import data
import scenes
from independent import corners, hull, same_box, scene_of, signed_dist_inside


# ---- synthetic labels vs pixels ------------------------------------------------------------------
def test_gt_boxes_cover_their_pixels():
    ds = scenes.SyntheticDataset("detection", 12, seed=3, max_objects=3)
    checked = 0
    for s in ds:
        S, H, W = s.frames.shape[:3]
        img, ids = scenes.render(scene_of(s), s.intrinsics, H, W)
        assert np.array_equal(img, s.frames)
        v, u = np.mgrid[0:H, 0:W] + 0.5
        pix = np.stack([u.ravel(), v.ravel()], 1)
        E = s.axis_align @ s.cam2global
        for b in s.boxes:
            j = next(i for i, o in enumerate(s.meta["objects"])
                     if same_box(boxes.box_to_world(b["bbox_3d"], E[0]), o["box"]))
            for k in range(S):
                T = np.linalg.inv(E[k]) @ E[0]
                c = corners(b["bbox_3d"]) @ T[:3, :3].T + T[:3, 3]   # the box in camera k
                if np.any(c[:, 2] < 0.05):
                    continue
                uv = (c @ s.intrinsics.T)[:, :2] / c[:, 2:]
                d = signed_dist_inside(hull(uv), pix).reshape(H, W)
                mine = ids[k] == j
                assert np.all(d[mine] > -1e-6), (
                    "pixels of the object fall outside its projected GT box")
                if s.meta["objects"][j]["shape"] == "box":  # a box's silhouette is exactly the hull
                    assert np.all(ids[k][d > 1.0] >= 0), (
                        "the projected GT box covers floor or wall pixels")
                checked += mine.sum()
        assert len(s.boxes) == len(s.meta["objects"])   # every object is visible somewhere
        assert all(max(p) >= 6 for p in s.meta["pixels"])
    assert checked > 1000


def test_camera_boxes_map_back_to_world():
    for s in scenes.SyntheticDataset("detection", 10, seed=1):
        E0 = s.axis_align @ s.cam2global[0]
        world = [boxes.box_to_world(b["bbox_3d"], E0) for b in s.boxes]
        for o in s.meta["objects"]:
            assert sum(same_box(w, o["box"]) for w in world) == 1
            # on the floor
            assert abs(o["box"][2] - o["box"][5] / 2) < 1e-9 and o["box"][7] == o["box"][8] == 0
        # the raw frame really differs from the aligned one
        assert not np.allclose(s.axis_align, np.eye(4))
    for s in scenes.SyntheticDataset("grounding", 10, seed=1):
        E = s.axis_align @ s.cam2global[s.target_frame]
        assert same_box(boxes.box_to_world(s.target_box, E), s.world_box)
        px = np.array(s.meta["pixels"][s.meta["target"]])
        assert s.target_frame == int(np.argmax(px))
        same = [o for o in s.meta["objects"] if o["label"] == s.meta["label"]]
        assert s.meta["unique"] == (len(same) == 1)


def resolve(expr, objects):
    """Indices of the objects an expression of ours can mean
    (independent of data.py's generator)."""
    colour = {c[0]: c[1] for c in scenes.CATEGORIES}
    vol = lambda o: np.prod(o["box"][3:6])
    dist = lambda a, b: np.linalg.norm(np.subtract(a["box"][:2], b["box"][:2]))
    idx = range(len(objects))
    m = re.fullmatch(r"The (largest|smallest) (.+)\.", expr)
    if m:
        cands = [i for i in idx if objects[i]["label"] == m.group(2)]
        best = (max if m.group(1) == "largest" else min)(cands, key=lambda i: vol(objects[i]))
        return [best]
    m = re.fullmatch(r"The (.+) (closest to|farthest from) the (.+)\.", expr)
    if m:
        refs = [o for o in objects if o["label"] == m.group(3)]
        assert len(refs) == 1
        cands = [i for i in idx if objects[i]["label"] == m.group(1)]
        pick = min if m.group(2) == "closest to" else max
        return [pick(cands, key=lambda i: dist(objects[i], refs[0]))]
    m = re.fullmatch(r"The (\w+) (box|cylinder)\.", expr)
    if m:
        return [i for i in idx if colour[objects[i]["label"]] == m.group(1)
                and objects[i]["shape"] == m.group(2)]
    label = next(c for c in colour if expr in (f"The {c}.", f"The {colour[c]} {c} in the room."))
    return [i for i in idx if objects[i]["label"] == label]


def test_referring_expressions_are_unambiguous():
    forms = set()
    for s in scenes.SyntheticDataset("grounding", 80, seed=4, min_objects=2, max_objects=4):
        assert resolve(s.description, s.meta["objects"]) == [s.meta["target"]], s.description
        forms.add(re.sub(r"the .*", "", s.description.split(" ", 1)[1]))
    assert len(forms) >= 4   # several kinds of expression occur


def test_objects_do_not_interpenetrate():
    for s in scenes.SyntheticDataset("detection", 30, seed=5, min_objects=3, max_objects=3):
        obs = s.meta["objects"]
        for i in range(len(obs)):
            for j in range(i + 1, len(obs)):
                assert min_footprint_distance(obs[i], obs[j]) > 0.05


# ---- spatial answers recomputed independently ----------------------------------------------------
def footprint_points(o, n=400):
    """Points on the boundary of an object's footprint."""
    x, y = o["box"][:2]
    if o["shape"] == "cylinder":
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([x + o["box"][3] / 2 * np.cos(t), y + o["box"][3] / 2 * np.sin(t)], 1)
    c = corners(o["box"])[[0, 4, 6, 2], :2]   # the bottom rectangle
    t = np.linspace(0, 1, n // 4, endpoint=False)[:, None]
    return np.concatenate([c[i] + t * (c[(i + 1) % 4] - c[i]) for i in range(4)])


def min_footprint_distance(a, b):
    p, q = footprint_points(a), footprint_points(b)
    return np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).min()


def letter_of(s, text):
    return next(o[0] for o in s.options if o[3:] == text)


def test_spatial_answers_recomputed():
    seen = set()
    for qt in data.SPATIAL_TYPES:
        for s in scenes.SyntheticDataset("spatial", 6, seed=11, question_types=[qt]):
            seen.add(s.question_type)
            obs, q = s.meta["objects"], s.question
            by = {o["label"]: o for o in obs}
            names = [n for n in by if re.search(rf"\b{n}\b", q)]
            if s.question_type == "object_counting":
                cat = re.search(r"How many (.+)\(s\)", q).group(1)
                assert s.ground_truth == str(sum(o["label"] == cat for o in obs))
            elif s.question_type == "object_size_estimation":
                assert abs(float(s.ground_truth) - 100 * max(by[names[0]]["box"][3:6])) <= 0.5
            elif s.question_type == "room_size_estimation":
                x0, y0, x1, y1, _ = s.meta["room"]
                assert abs(float(s.ground_truth) - (x1 - x0) * (y1 - y0)) <= 0.05
            elif s.question_type == "object_abs_distance":
                a, b = re.search(r"apart are the (.+) and the (.+) \(in meters\)", q).groups()
                assert abs(float(s.ground_truth) - min_footprint_distance(by[a], by[b])) < 0.02
            elif s.question_type == "object_rel_distance":
                choices = re.search(r"\((.+)\)", q).group(1).split(", ")
                query = re.search(r"nearest to the (.+)\?", q).group(1)
                best = min(choices, key=lambda c: min_footprint_distance(by[c], by[query]))
                assert s.ground_truth == letter_of(s, best)
            elif s.question_type.startswith("object_rel_direction"):
                p, o, t = re.search(r"next to the (.+) and looking toward the (.+), is the (.+?) "
                                    r"(on|to) ", q).groups()[:3]
                f = np.subtract(by[o]["box"][:2], by[p]["box"][:2])
                v = np.subtract(by[t]["box"][:2], by[p]["box"][:2])
                # z up: a positive cross product is to the left
                f3, v3 = np.append(f, 0), np.append(v, 0)
                left = np.cross(f3, v3)[2] > 0
                ahead = f @ v > 0
                cos = f @ v / np.linalg.norm(f) / np.linalg.norm(v)
                if s.question_type.endswith("easy"):
                    want = "left" if left else "right"
                elif s.question_type.endswith("medium"):
                    want = ("back" if cos <= math.cos(math.radians(135))
                            else ("left" if left else "right"))
                else:
                    want = ("front-" if ahead else "back-") + ("left" if left else "right")
                assert s.ground_truth == letter_of(s, want), (q, s.options, s.ground_truth)
            elif s.question_type == "obj_appearance_order":
                H, W = s.frames.shape[1:3]
                _, ids = scenes.render(scene_of(s), s.intrinsics, H, W)
                cats = re.search(r"video: (.+)\?", q).group(1).split(", ")
                first = {c: next(k for k in range(len(ids))
                                 if (ids[k] == obs.index(by[c])).sum() >= 6) for c in cats}
                assert s.ground_truth == letter_of(s, ", ".join(sorted(cats, key=first.get)))
            if s.options:
                assert [o[:3] for o in s.options] == [f"{L}. " for L in "ABCD"[:len(s.options)]]
                assert s.ground_truth in "ABCD"[:len(s.options)]
            else:
                float(s.ground_truth)
    assert seen == set(data.SPATIAL_TYPES)


# ---- determinism, loaders ------------------------------------------------------------------------
def test_same_seed_same_samples_and_workers():
    a = scenes.SyntheticDataset("grounding", 6, seed=7)
    b = scenes.SyntheticDataset("grounding", 6, seed=7)
    c = scenes.SyntheticDataset("grounding", 6, seed=8)
    for i in range(6):
        assert np.array_equal(a[i].frames, b[i].frames) and a[i].target_box == b[i].target_box
        assert (a[i].description == b[i].description
                and np.array_equal(a[i].cam2global, b[i].cam2global))
    assert not np.array_equal(a[0].frames, c[0].frames)
    loader = torch.utils.data.DataLoader(a, batch_size=3, num_workers=2, collate_fn=data.collate)
    got = [s for batch in loader for s in batch]
    assert [s.id for s in got] == [a[i].id for i in range(6)]
    assert all(np.array_equal(s.frames, a[i].frames) for i, s in enumerate(got))


def test_knobs():
    s = scenes.SyntheticDataset("detection", 1, seed=0, frames=6, size=(48, 64),
                                min_objects=3, max_objects=3)[0]
    assert (s.frames.shape == (6, 48, 64, 3) and s.frames.dtype == np.uint8
            and s.cam2global.shape == (6, 4, 4))
    assert len(s.boxes) == 3


def test_box_spellings():
    """Camera boxes follow DESIGN's convention; a level camera needs one angle; the
    camera's pitch is b; the random spelling writes the same solids (same corners) as the
    canonical one, only differently."""
    for pitch in (0.0, 20.0):
        for s in scenes.SyntheticDataset("detection", 12, seed=4, pitch=pitch):
            R0 = s.cam2global[0][:3, :3]
            # the camera looks down by `pitch`
            assert abs(math.degrees(math.asin(-R0[2, 2])) - pitch) < 1e-9
            for b in s.boxes:
                x, y, z, dx, dy, dz, a, bb, c = b["bbox_3d"]
                # no roll; b is the camera's pitch
                assert abs(a) < 1e-9 and abs(bb - math.radians(pitch)) < 1e-9
                # x' is the longer side
                assert -math.pi / 2 - 1e-9 <= c < math.pi / 2 and dx >= dz - 1e-12
                # cylinders face the camera: invisible yaw
                if b["label"] in ("trash can", "lamp", "stool"):
                    assert abs(c) < 1e-9
            # y' is "down": the box's local y axis is world -z
            # (corner 2 - corner 0 runs along y', row 4x+2y+z)
            E0 = s.axis_align @ s.cam2global[0]
            for b in s.boxes:
                k = corners(b["bbox_3d"])
                down = E0[:3, :3] @ (k[2] - k[0])
                assert np.allclose(down / np.linalg.norm(down), [0, 0, -1], atol=1e-9)
    canonical = scenes.SyntheticDataset("detection", 20, seed=6, min_objects=2)
    rand = scenes.SyntheticDataset("detection", 20, seed=6, min_objects=2, spelling="random")
    changed = 0
    for s, r in zip(canonical, rand):
        assert np.array_equal(s.frames, r.frames) and len(s.boxes) == len(r.boxes)
        for b in r.boxes:
            assert sum(same_box(b["bbox_3d"], c["bbox_3d"]) and b["label"] == c["label"]
                       for c in s.boxes) == 1
        changed += any(not np.allclose(b["bbox_3d"], c["bbox_3d"])
                       for b, c in zip(r.boxes, s.boxes))
    assert changed >= 10  # most scenes are spelled differently


def test_main_export_and_show(tmp_path):
    scenes.main(["export", "--task", "detection", "--n", "3", "--out", str(tmp_path / "x")])
    assert len(json.load(open(tmp_path / "x" / "detection.json"))) == 3
    scenes.main(["show", "--task", "grounding", "--seed", "0", "--out", str(tmp_path / "g.png")])
    assert Image.open(tmp_path / "g.png").size == (4 * 56 * 4, 56 * 4)
