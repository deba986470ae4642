"""scenes.py: rft3d's synthetic 3D world, the embedded default on which every command runs offline.

A scene is a room (checkered floor, walls) with upright coloured boxes and cylinders, seen by a
moving camera with known intrinsics and poses, ray cast by our own numpy renderer. Ground truth is
exact and follows the real-data conventions (DESIGN.md section 3) so the same code trains on
ScanNet:
  detection   9-DoF boxes in the FIRST frame's camera coordinates, sorted left to right
  grounding   an unambiguous referring expression -> the frame where the object is largest + its
              box in that camera
  spatial     VSI-Bench-style questions with computable answers (8 of its 9 types)
Sample i of a set is a pure function of (seed, i): the same scenes on every machine, "fresh data" =
a new index.

Sections: 1. the world (categories, layout, cameras, renderer)   2. ground truth per task
(questions, referring expressions, camera boxes; make_sample)   3. SyntheticDataset and the
world's flags (train.py and eval.py declare them here)   4. the command
line (`python scenes.py show|export|speed`: draw a sample's boxes, export scenes in VG-LLM's layout,
time sample generation). To change the world (difficulty, new categories, another task) this is the
file to edit. Builds on data.py (Sample, export, drawing) and boxes.py; nothing above them is
imported here.
"""
import argparse
import itertools
import math
import os
import time

import numpy as np
import torch

import data
from boxes import euler_to_matrix, matrix_to_euler
from data import SPATIAL_TYPES, TASK_NAMES, Sample

# --------------------------------------------------------------------------------------------------
# 1. The world: a room (checkered floor, walls) with upright boxes and cylinders on the floor
# --------------------------------------------------------------------------------------------------
# name, colour, shape, size ranges (x, y, z) in metres; a cylinder's x = y = diameter and its yaw is
# 0 (a cylinder's yaw cannot be seen). Each category has its own colour, so a tiny model can tell
# them apart.
CATEGORIES = [
    ("chair", "red", (220, 45, 45), "box", (0.45, 0.6), (0.45, 0.6), (0.8, 1.0)),
    ("table", "orange", (245, 150, 35), "box", (0.9, 1.4), (0.6, 0.9), (0.65, 0.8)),
    ("cabinet", "blue", (45, 80, 225), "box", (0.5, 0.9), (0.4, 0.6), (1.0, 1.5)),
    ("sofa", "purple", (150, 60, 190), "box", (1.4, 2.0), (0.75, 0.95), (0.6, 0.85)),
    ("tv", "cyan", (30, 200, 210), "box", (0.8, 1.2), (0.1, 0.2), (0.5, 0.75)),
    ("trash can", "green", (50, 180, 70), "cylinder", (0.3, 0.45), None, (0.45, 0.65)),
    ("lamp", "yellow", (240, 220, 40), "cylinder", (0.25, 0.35), None, (1.2, 1.6)),
    ("stool", "pink", (245, 120, 185), "cylinder", (0.35, 0.5), None, (0.45, 0.6)),
]
CAT = {c[0]: c for c in CATEGORIES}
LIGHT = np.array([0.4, 0.3, 1.0]) / np.linalg.norm([0.4, 0.3, 1.0])
FLOOR = (np.array([170, 160, 140]), np.array([125, 118, 105]))   # checker tones, 0.5 m squares
WALL, CEILING, WALL_HEIGHT = np.array([190, 196, 206]), np.array([228, 228, 232]), 2.6


def footprint(o):
    """2D footprint: ("circle", centre, radius) or ("poly", [4,2] corners) of an upright object."""
    c = np.asarray(o["box"][:2], float)
    if o["shape"] == "cylinder":
        return ("circle", c, o["box"][3] / 2)
    ca, sa = math.cos(o["box"][6]), math.sin(o["box"][6])
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * np.array(o["box"][3:5]) / 2
    return ("poly", c + half @ np.array([[ca, sa], [-sa, ca]]))


def _point_poly_dist(p, poly):
    edges = np.roll(poly, -1, 0) - poly
    rel = p - poly
    if np.all(edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0] >= 0):
        return 0.0   # inside (counter-clockwise corners)
    t = np.clip((rel * edges).sum(1) / (edges ** 2).sum(1), 0, 1)
    return float(np.min(np.linalg.norm(rel - t[:, None] * edges, axis=1)))


def footprint_distance(o1, o2):
    """Closest-point distance between two objects standing on the floor (0 if they touch). Both
    start at z = 0, so their height ranges overlap and the 3D closest-point distance is the 2D
    footprint distance."""
    f1, f2 = footprint(o1), footprint(o2)
    if f1[0] == "circle" and f2[0] == "circle":
        return max(0.0, float(np.linalg.norm(f1[1] - f2[1])) - f1[2] - f2[2])
    if f1[0] == "circle" or f2[0] == "circle":
        (_, c, r), (_, poly) = (f1, f2) if f1[0] == "circle" else (f2, f1)
        return max(0.0, _point_poly_dist(c, poly) - r)
    p, q = f1[1], f2[1]
    for poly in (p, q):   # separating axis test: overlapping convex polygons have distance 0
        e = np.roll(poly, -1, 0) - poly
        normals = np.stack([-e[:, 1], e[:, 0]], 1)
        if not any((p @ n).max() < (q @ n).min() or (q @ n).max() < (p @ n).min() for n in normals):
            continue
        return min(min(_point_poly_dist(v, q) for v in p), min(_point_poly_dist(v, p) for v in q))
    return 0.0


def look_at(eye, target, pitch=None):
    """4x4 OpenCV camera-to-world for a camera at eye looking at target, world z up, no roll. With
    `pitch` (radians, down) the camera faces target's direction on the floor plane, tilted down by
    exactly `pitch`."""
    f = target - eye
    if pitch is not None:
        f = np.array([f[0], f[1], 0.0]) / np.linalg.norm(f[:2])
        f = math.cos(pitch) * f + np.array([0.0, 0.0, -math.sin(pitch)])
    f = f / np.linalg.norm(f)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r = r / np.linalg.norm(r)
    T = np.eye(4)
    T[:3, :3] = np.stack([r, np.cross(f, r), f], 1)   # columns: x right, y down, z forward
    T[:3, 3] = eye
    return T


def make_scene(rng, n_objects, frames, camera="orbit", motion=None, gap=0.1, pitch=None):
    """Objects (aligned world, upright, non-interpenetrating footprints), room and camera poses.
    orbit: the camera circles the objects by `motion` radians (default 0.6) looking at their centre.
    pan:   the camera stands still and turns by `motion` radians (default 2.0) across objects spread
           around it, so objects enter the view one after another (used for appearance order).
    pitch: None = a hand-held camera 1.3-1.8 m up looking at a point 0.4 m above the floor (it
           pitches down by ~15-30 degrees, a little differently in every frame); a number = a
           camera mounted at a fixed height, pitched down by that many degrees in every frame, no
           roll: with 0 it is level, so its y axis is gravity and upright boxes need one angle (see
           camera_box)."""
    objects = place_objects(rng, n_objects, camera, gap)
    c2w = camera_path(rng, objects, frames, camera, motion, pitch)
    # room: the bounding rectangle of objects and cameras plus random margins; then shift so that
    # the room's corner is the aligned world origin (like ScanNet's axis-aligned frame, floor at
    # z = 0)
    pts = np.concatenate([c2w[:, :2, 3]] + [footprint_corners(o) for o in objects])
    lo = pts.min(0) - rng.uniform(0.4, 1.5, 2)
    hi = pts.max(0) + rng.uniform(0.4, 1.5, 2)
    for o in objects:
        o["box"][0] -= lo[0]
        o["box"][1] -= lo[1]
        o["box"] = [float(x) for x in o["box"]]
    c2w[:, :2, 3] -= lo
    room = [0.0, 0.0, float(hi[0] - lo[0]), float(hi[1] - lo[1]), WALL_HEIGHT]
    return {"objects": objects, "room": room, "c2w": c2w}


def place_objects(rng, n_objects, camera, gap):
    """Up to n_objects random objects (200 tries), footprints more than `gap` apart: spread around
    a pan camera at the origin, else within a disc around the origin."""
    objects, tries = [], 0
    while len(objects) < n_objects and tries < 200:
        tries += 1
        name, colour, rgb, shape, rx, ry, rz = CATEGORIES[rng.integers(len(CATEGORIES))]
        dx, dz = rng.uniform(*rx), rng.uniform(*rz)
        dy, yaw = (dx, 0.0) if shape == "cylinder" else \
            (rng.uniform(*ry), rng.uniform(-math.pi / 2, math.pi / 2))
        if camera == "pan":   # spread around a camera at the origin facing +x
            ang, dist = rng.uniform(-1.3, 1.3), rng.uniform(1.8, 3.0)
            xy = dist * np.array([math.cos(ang), math.sin(ang)])
        else:                 # within a disc around the origin
            ang, dist = rng.uniform(-math.pi, math.pi), 1.2 * math.sqrt(rng.uniform())
            xy = dist * np.array([math.cos(ang), math.sin(ang)])
        box = [xy[0], xy[1], dz / 2, dx, dy, dz, yaw, 0.0, 0.0]
        o = {"label": name, "shape": shape, "box": box}
        if all(footprint_distance(o, p) > gap for p in objects):
            objects.append(o)
    return objects


def camera_path(rng, objects, frames, camera, motion, pitch):
    """Camera-to-world poses [frames,4,4] of a pan or orbit camera (see make_scene)."""
    S = frames
    s = np.linspace(-0.5, 0.5, S) if S > 1 else np.zeros(1)
    # With a given pitch the camera is mounted at a fixed height (the central ray meets the objects,
    # ~2.6 m away, half a metre up), like a robot's camera: then the image row where an object
    # meets the floor tells its depth (z = f h / (v - c_y) for a level camera). A height that varies
    # per scene would make depth ambiguous.
    height = rng.uniform(1.3, 1.8) if pitch is None else 0.5 + 2.6 * math.tan(math.radians(pitch))
    tilt = None if pitch is None else math.radians(pitch)
    if camera == "pan":
        eye = np.array([0.0, 0.0, height])
        heading = (motion if motion is not None else 2.0) * s + rng.uniform(-0.1, 0.1)
        targets = np.stack([2.4 * np.cos(heading), 2.4 * np.sin(heading), np.full(S, 0.4)], 1)
        return np.stack([look_at(eye, t, tilt) for t in targets])
    centre = np.mean([o["box"][:2] for o in objects], 0) if objects else np.zeros(2)
    radius, phi0 = rng.uniform(2.2, 3.0), rng.uniform(-math.pi, math.pi)
    phi = phi0 + (motion if motion is not None else 0.6) * s
    c2w = []
    for k in range(S):
        eye = np.array([centre[0] + radius * math.cos(phi[k]),
                        centre[1] + radius * math.sin(phi[k]), height])
        target = np.array([*(centre + rng.uniform(-0.2, 0.2, 2)), 0.4])
        jitter = rng.uniform(-0.05, 0.05, 3)   # hand-held wobble (horizontal only when mounted)
        jitter[2] *= pitch is None
        c2w.append(look_at(eye + jitter, target, tilt))
    return np.stack(c2w)


def footprint_corners(o):
    f = footprint(o)
    if f[0] == "poly":
        return f[1]
    return f[1] + f[2] * np.array([[1, 0], [-1, 0], [0, 1], [0, -1.0]])


def intrinsics_for(H, W):
    """Pinhole K with a ~67 degree horizontal field of view."""
    f = 0.75 * W
    return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])


def _hit(ob, ol, dl):
    """Ray parameter t of the first hit with an object, inf on a miss. Object-local rays: origins
    ol [S,1,3], directions dl [S,N,3]."""
    half = np.array(ob["box"][3:6]) / 2
    if ob["shape"] == "box":   # slab test
        t1, t2 = (-half - ol) / dl, (half - ol) / dl
        t, t_far = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
        return np.where((t <= t_far) & (t > 0), t, np.inf)
    r = half[0]                # vertical cylinder: the side (a quadratic in x, y) and the two caps
    a = dl[..., 0] ** 2 + dl[..., 1] ** 2
    b = 2 * (ol[..., 0] * dl[..., 0] + ol[..., 1] * dl[..., 1])
    disc = b * b - 4 * a * (ol[..., 0] ** 2 + ol[..., 1] ** 2 - r * r)
    ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    on_side = (disc > 0) & (ts > 0) & (np.abs(ol[..., 2] + ts * dl[..., 2]) <= half[2])
    ts = np.where(on_side, ts, np.inf)
    tc = (np.where(dl[..., 2] < 0, half[2], -half[2]) - ol[..., 2]) / dl[..., 2]
    pc = ol[..., :2] + tc[..., None] * dl[..., :2]
    return np.minimum(ts, np.where(((pc ** 2).sum(-1) <= r * r) & (tc > 0), tc, np.inf))


def _normal(ob, p):
    """Object-local outward normals at surface points p [M,3]: of the face p is closest to."""
    half = np.array(ob["box"][3:6]) / 2
    if ob["shape"] == "box":
        axis = np.argmax(np.abs(p) / half, 1)
        return np.eye(3)[axis] * np.sign(p[np.arange(len(p)), axis])[:, None]
    radial = np.linalg.norm(p[:, :2], axis=1)
    cap = np.abs(p[:, 2]) / half[2] >= radial / half[0]
    side = np.concatenate([p[:, :2] / np.maximum(radial, 1e-9)[:, None], np.zeros((len(p), 1))], 1)
    return np.where(cap[:, None], np.array([0, 0, 1.0]) * np.sign(p[:, 2:3]), side)


def render(scene, K, H, W):
    """Ray cast all frames at once. Returns images uint8 [S,H,W,3] and an object-id buffer int16
    [S,H,W] (object index, -1 floor, -2 wall, -3 ceiling). scene["c2w"] is camera -> aligned
    world."""
    c2w, objects = scene["c2w"], scene["objects"]
    S = len(c2w)
    v, u = np.mgrid[0:H, 0:W] + 0.5
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    d_cam = d_cam.reshape(-1, 3)
    d = d_cam @ c2w[:, :3, :3].transpose(0, 2, 1)   # [S,N,3] ray directions (world)
    o = c2w[:, None, :3, 3]                         # [S,1,3] ray origins: camera centres
    x0, y0, x1, y1, h = scene["room"]
    local = []
    with np.errstate(divide="ignore", invalid="ignore"):
        # the room: each ray leaves the room box through the floor, a wall or the ceiling
        t_exit = np.where(d > 0, (np.array([x1, y1, h]) - o) / d, (np.array([x0, y0, 0.0]) - o) / d)
        face = np.argmin(t_exit, -1)
        best = np.take_along_axis(t_exit, face[..., None], -1)[..., 0]   # [S,N] nearest hit so far
        ids = np.where(face < 2, -2, np.where(d[..., 2] < 0, -1, -3)).astype(np.int16)
        for j, ob in enumerate(objects):
            R = euler_to_matrix(*ob["box"][6:9])
            local.append(((o - ob["box"][:3]) @ R, d @ R))           # object-local rays
            t = _hit(ob, *local[-1])
            m = t < best
            best[m], ids[m] = t[m], j
    # shading: checkered floor, walls by orientation, objects flat-shaded by their face normal
    hitp = o + best[..., None] * d
    img = np.empty((S, H * W, 3))
    checker = (np.floor(hitp[..., 0] / 0.5) + np.floor(hitp[..., 1] / 0.5)) % 2 == 0
    img[(ids == -1) & checker], img[(ids == -1) & ~checker] = FLOOR
    img[ids == -2] = WALL * np.where(face[ids == -2] == 0, 0.85, 1.0)[:, None]
    img[ids == -3] = CEILING
    for j, (ob, (ol, dl)) in enumerate(zip(objects, local)):
        m = ids == j
        if m.any():
            n = _normal(ob, np.broadcast_to(ol, dl.shape)[m] + best[m][:, None] * dl[m])
            light = n @ euler_to_matrix(*ob["box"][6:9]).T @ LIGHT
            img[m] = np.array(CAT[ob["label"]][2]) * (0.6 + 0.4 * np.clip(light, 0, 1))[:, None]
    return img.reshape(S, H, W, 3).clip(0, 255).astype(np.uint8), ids.reshape(S, H, W)


# --------------------------------------------------------------------------------------------------
# 2. Ground truth for the three tasks
# --------------------------------------------------------------------------------------------------
# the objects a task or question type needs at least
NEEDS = {"grounding": 1, "object_counting": 1, "object_size_estimation": 1,
         "object_abs_distance": 2, "object_rel_distance": 3, "obj_appearance_order": 3,
         "object_rel_direction_easy": 3, "object_rel_direction_medium": 3,
         "object_rel_direction_hard": 3}
LETTERS = "ABCDEFGH"


def _mc(rng, correct, wrong):
    """Shuffle the correct answer among the wrong ones -> (["A. ..", ..], letter)."""
    opts = [correct] + list(wrong)
    order = rng.permutation(len(opts))
    return [f"{LETTERS[i]}. {opts[j]}" for i, j in enumerate(order)], LETTERS[int(np.argmin(order))]


def direction_angle(p, o, q):
    """Signed angle (degrees, counter-clockwise = left) of q seen from p while facing o, on the
    floor plane."""
    f, v = np.subtract(o[:2], p[:2]), np.subtract(q[:2], p[:2])
    return math.degrees(math.atan2(f[0] * v[1] - f[1] * v[0], f @ v))


def spatial_question(rng, qtype, objects, room, first_seen):
    """(question, options, ground_truth) for a VSI-Bench question type, or None when this scene
    cannot pose it unambiguously. Only objects whose category is unique in the scene are referred
    to by name."""
    labels = [o["label"] for o in objects]
    uniq = [o for o in objects if labels.count(o["label"]) == 1]
    pick = lambda k: [uniq[i] for i in rng.permutation(len(uniq))[:k]]
    if qtype == "object_counting":
        cat = sorted(set(labels))[rng.integers(len(set(labels)))]
        return f"How many {cat}(s) can be found in this room?", [], str(labels.count(cat))
    if qtype == "object_size_estimation" and uniq:
        o = pick(1)[0]
        q = (f"How long is the longest side (length, width or height) of the {o['label']}, in "
             f"centimeters?")
        return q, [], str(round(max(o["box"][3:6]) * 100))
    if qtype == "room_size_estimation":
        q = "How large is the floor area of this room, in square meters?"
        return q, [], f"{room[2] * room[3]:.1f}"
    if qtype == "object_abs_distance" and len(uniq) >= 2:
        a, b = pick(2)
        dist = footprint_distance(a, b)
        if dist >= 0.2:
            q = (f"Measured between the closest points of the two objects, how far apart are the "
                 f"{a['label']} and the {b['label']} (in meters)?")
            return q, [], f"{dist:.2f}"
    if qtype == "object_rel_distance" and len(uniq) >= 3:
        query, *choices = pick(5)
        dist = sorted((footprint_distance(query, c), c["label"]) for c in choices)
        if dist[1][0] - dist[0][0] >= 0.15:
            options, gt = _mc(rng, dist[0][1], [n for _, n in dist[1:]])
            names = ", ".join(x[3:] for x in options)
            return (f"Measured between closest points, which of these objects ({names}) is nearest "
                    f"to the {query['label']}?", options, gt)
    if qtype.startswith("object_rel_direction") and len(uniq) >= 3:
        return direction_question(rng, qtype, *pick(3))
    if qtype == "obj_appearance_order":
        return appearance_order_question(rng, objects, labels, first_seen)
    return None


def direction_question(rng, qtype, p, o, q):
    """An object_rel_direction_{easy,medium,hard} question: standing at p, facing o, where is q?
    None when p is within 0.3 m of o or q, or q's direction is too close to a border between the
    answers."""
    if np.linalg.norm(np.subtract(o["box"][:2], p["box"][:2])) < 0.3 or \
       np.linalg.norm(np.subtract(q["box"][:2], p["box"][:2])) < 0.3:
        return None
    ang = direction_angle(p["box"], o["box"], q["box"])
    stem = (f"Standing next to the {p['label']} and looking toward the {o['label']}, is the "
            f"{q['label']}")
    if qtype.endswith("easy") and 15 < abs(ang) < 165:
        return (f"{stem} on the left or on the right of the {o['label']}?",
                *_mc(rng, "left" if ang > 0 else "right", ["right" if ang > 0 else "left"]))
    if qtype.endswith("medium") and abs(ang) > 15 and abs(abs(ang) - 135) > 10:
        ans = "back" if abs(ang) >= 135 else ("left" if ang > 0 else "right")
        return (f"{stem} on my left, on my right, or behind me? Something is behind me if I would "
                f"need to turn by 135 degrees or more to face it.",
                *_mc(rng, ans, [w for w in ("left", "right", "back") if w != ans]))
    if qtype.endswith("hard") and min(abs(ang - x) for x in (-180, -90, 0, 90, 180)) > 10:
        ans = ("front" if abs(ang) < 90 else "back") + ("-left" if ang > 0 else "-right")
        quads = ["front-left", "front-right", "back-left", "back-right"]
        return (f"{stem} to my front-left, front-right, back-left or back-right? Think of the "
                f"quadrants of a plane where I stand at the origin and face the positive y-axis.",
                *_mc(rng, ans, [w for w in quads if w != ans]))
    return None


def appearance_order_question(rng, objects, labels, first_seen):
    """An obj_appearance_order question over 3-4 categories that are unique in the scene and each
    first appear alone (first_seen: each object's first frame); None when fewer than 3 do."""
    seen = sorted((first_seen[i], o["label"]) for i, o in enumerate(objects)
                  if labels.count(o["label"]) == 1)
    firsts = [f for f, _ in seen]
    seen = [s for s in seen if firsts.count(s[0]) == 1][:4]   # each must first appear alone
    if len(seen) < 3:
        return None
    order = [n for _, n in seen]
    perms = [list(p) for p in itertools.permutations(order) if list(p) != order]
    wrong = [", ".join(perms[i]) for i in rng.permutation(len(perms))[:3]]
    options, gt = _mc(rng, ", ".join(order), wrong)
    cats = ", ".join(order[i] for i in rng.permutation(len(order)))
    return f"In what order do these categories first appear in the video: {cats}?", options, gt


def grounding_expression(rng, objects, t):
    """An unambiguous referring expression for objects[t], or None."""
    o = objects[t]
    name, colour, shape = o["label"], CAT[o["label"]][1], o["shape"]
    same = [p for p in objects if p["label"] == name and p is not o]
    if not same:
        return [f"The {name}.", f"The {colour} {shape}.",
                f"The {colour} {name} in the room."][rng.integers(3)]
    exprs = []
    vol = lambda p: float(np.prod(p["box"][3:6]))
    if all(vol(o) > 1.3 * vol(p) for p in same):
        exprs.append(f"The largest {name}.")
    if all(vol(p) > 1.3 * vol(o) for p in same):
        exprs.append(f"The smallest {name}.")
    dist = lambda a, b: float(np.linalg.norm(np.subtract(a["box"][:2], b["box"][:2])))
    for ref in objects:
        if sum(p["label"] == ref["label"] for p in objects) != 1:
            continue
        if all(dist(o, ref) + 0.3 < dist(p, ref) for p in same):
            exprs.append(f"The {name} closest to the {ref['label']}.")
        if all(dist(o, ref) > dist(p, ref) + 0.3 for p in same):
            exprs.append(f"The {name} farthest from the {ref['label']}.")
    return exprs[rng.integers(len(exprs))] if exprs else None


# The object's own axes in the camera: x' = x, y' = -z (down), z' = y, so sizes (dx, dz, dy).
# Upright objects then turn about their y' axis only, the last factor of R = Rz(a) Rx(b) Ry(c): a
# level camera gives a = b = 0 exactly.
TO_Y_DOWN = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])


def camera_box(o, world_to_cam, spelling="canonical", rng=None):
    """An object's 9-DoF box in a camera's coordinates (DESIGN section 3's convention), spelled one
    way.

    The same box has several spellings: turning it about its vertical axis by k * 90 degrees
    (c + k pi/2, x and z sizes swapped for odd k) and listing objects in any order give the same IoU
    but different SFT target text.
      canonical: x' is the longer horizontal side and c in [-pi/2, pi/2).
      random:    one of the four turns at random (c wrapped to [-pi, pi)): the targets CE sees are
                 multimodal.
    Returns the box [9 floats]."""
    x, y, z, dx, dy, dz, yaw = o["box"][:7]
    T = np.asarray(world_to_cam, float)
    R = T[:3, :3] @ euler_to_matrix(yaw, 0.0, 0.0) @ TO_Y_DOWN   # object axes x', y', z' in camera
    size = [dx, dz, dy]
    a, b, c = matrix_to_euler(R)
    if size[0] < size[2]:   # the longer horizontal side on x': a quarter turn swaps x' and z'
        c, size = c + math.pi / 2, [size[2], size[1], size[0]]
    c = (c + math.pi / 2) % math.pi - math.pi / 2   # a half turn is the same box: [-pi/2, pi/2)
    if spelling == "random":
        k = int(rng.integers(4))
        c = (c + k * math.pi / 2 + math.pi) % (2 * math.pi) - math.pi
        size = [size[2], size[1], size[0]] if k % 2 else size
    elif spelling != "canonical":
        raise ValueError(f"spelling must be 'canonical' or 'random', got {spelling!r}")
    centre = T[:3, :3] @ [x, y, z] + T[:3, 3]
    return [*map(float, centre), *map(float, size), float(a), float(b), float(c)]


def face_camera(objects, cam2world):
    """A cylinder looks the same at any yaw, so the yaw of its box cannot be seen: turn each
    cylinder's box to face the camera whose coordinates the answer uses (its x axis along the
    camera's, which look_at keeps level), so the ground truth never depends on something invisible.
    The rendering does not change."""
    for o in objects:
        if o["shape"] == "cylinder":
            o["box"][6] = math.atan2(cam2world[1, 0], cam2world[0, 0])


def make_sample(task, seed, index, frames=4, size=56, min_objects=1, max_objects=1, camera="orbit",
                motion=None, question_types=SPATIAL_TYPES, min_pixels=6, axis_align=True, pitch=0.0,
                spelling="canonical"):
    """Sample `index` of the synthetic set `seed`: a pure function of its arguments. pitch: the
    camera's downward pitch in degrees (None: the older look-at camera, see make_scene); spelling:
    of the target boxes and the order of detections (camera_box)."""
    rng = np.random.default_rng([seed, index])
    H, W = (size, size) if isinstance(size, int) else size
    K = intrinsics_for(H, W)
    qtypes = list(question_types)
    qtype = qtypes[rng.integers(len(qtypes))] if task == "spatial" else None
    for attempt in range(60):
        if task == "spatial" and attempt and attempt % 20 == 0:   # this type does not fit:
            qtype = qtypes[(qtypes.index(qtype) + 1) % len(qtypes)]   # take the next one
        lo = max(min_objects, NEEDS.get(qtype or task, 0))
        cam = "pan" if qtype == "obj_appearance_order" else camera
        n_objects = int(rng.integers(lo, max(lo, max_objects) + 1))
        scene = make_scene(rng, n_objects, frames, cam, motion, pitch=pitch)
        img, px = render_seen(scene, K, H, W, frames, min_pixels)
        objects = scene["objects"]
        if len(objects) < lo or not np.all(px.max(1, initial=0) >= min_pixels):
            continue
        if task == "grounding":
            t = int(rng.integers(len(objects)))
            desc = grounding_expression(rng, objects, t)
            if desc is None:
                continue
        if task == "spatial":
            first_seen = [int(np.argmax(p >= min_pixels)) for p in px]
            qa = spatial_question(rng, qtype, objects, scene["room"], first_seen)
            if qa is None:
                continue
        break
    else:
        raise RuntimeError(f"synthetic sample {seed}/{index} ({task}, {qtype}) found no valid "
                           "scene")
    A = random_axis_align(rng) if axis_align else np.eye(4)
    cam2global = np.linalg.inv(A) @ scene["c2w"]
    meta = {"objects": objects, "room": scene["room"], "pixels": px.tolist(),
            "scene": f"syn{seed}_{index:07d}"}
    s = Sample(id=f"synthetic-{task}-{seed}-{index}", task=task, frames=img, intrinsics=K,
               cam2global=cam2global, axis_align=A, meta=meta)
    if task == "detection":
        s.boxes = detection_boxes(objects, scene["c2w"][0], spelling, rng)
    elif task == "grounding":
        k = int(np.argmax(px[t]))   # the sampled frame where the target covers the most pixels
        face_camera([objects[t]], scene["c2w"][k])
        s.description, s.target_frame, s.world_box = desc, k, objects[t]["box"]
        s.target_box = camera_box(objects[t], np.linalg.inv(scene["c2w"][k]), spelling, rng)
        meta.update(label=objects[t]["label"], target=t,
                    unique=sum(o["label"] == objects[t]["label"] for o in objects) == 1)
    else:
        s.question, s.options, s.ground_truth = qa
        s.question_type = qtype
    return s


def render_seen(scene, K, H, W, frames, min_pixels):
    """Render the scene; objects that no frame sees (< min_pixels) leave it and it is rendered
    again. -> (images [S,H,W,3], pixels per object and frame [n,S])."""
    img, ids = render(scene, K, H, W)
    seen = [j for j in range(len(scene["objects"])) if (ids == j).sum((1, 2)).max() >= min_pixels]
    if len(seen) < len(scene["objects"]):
        scene["objects"] = [scene["objects"][j] for j in seen]
        img, ids = render(scene, K, H, W)
    px = [(ids == j).sum((1, 2)) for j in range(len(scene["objects"]))]
    return img, np.array(px, int).reshape(-1, frames)


def random_axis_align(rng):
    """A random raw-world frame: cam2global is camera -> raw world, and the returned axis_align
    maps raw -> aligned world (the room's frame)."""
    A = np.eye(4)
    th = rng.uniform(-math.pi, math.pi)
    A[:3, :3] = euler_to_matrix(th, 0, 0)
    A[:2, 3] = rng.uniform(-3, 3, 2)
    return A


def detection_boxes(objects, cam2world, spelling, rng):
    """Every object's box in the (first) camera cam2world. canonical: sorted left to right, a
    learnable order; random: each box spelled at random (camera_box), the boxes shuffled."""
    face_camera(objects, cam2world)
    to_cam = np.linalg.inv(cam2world)
    boxes = [{"label": o["label"], "bbox_3d": camera_box(o, to_cam, spelling, rng)}
             for o in objects]
    if spelling == "canonical":
        return sorted(boxes, key=lambda b: b["bbox_3d"][0])
    return [boxes[i] for i in rng.permutation(len(boxes))]


# --------------------------------------------------------------------------------------------------
# 3. SyntheticDataset: item i is a pure function of (seed, i); "infinite fresh data" = huge n or a
#    new seed
# --------------------------------------------------------------------------------------------------
# a fixed set whose frames fit in 512 MiB keeps its samples in memory (4 x 56 px: 38 KB each)
CACHE_BYTES = 2**29


class SyntheticDataset(torch.utils.data.Dataset):
    def __init__(self, task, n, seed=0, frames=4, size=56, min_objects=1, max_objects=1,
                 camera="orbit", motion=None, question_types=SPATIAL_TYPES, min_pixels=6,
                 axis_align=True, pitch=0.0, spelling="canonical"):
        assert task in TASK_NAMES, task
        self.task, self.n, self.seed, self.cache = task, n, seed, {}
        H, W = (size, size) if isinstance(size, int) else size
        self.cached = n * frames * H * W * 3 <= CACHE_BYTES
        self.kw = dict(frames=frames, size=size, min_objects=min_objects, max_objects=max_objects,
                       camera=camera, motion=motion, question_types=tuple(question_types),
                       min_pixels=min_pixels, axis_align=axis_align, pitch=pitch, spelling=spelling)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        if not self.cached:
            return make_sample(self.task, self.seed, i, **self.kw)
        if i not in self.cache:   # a fixed set is read many times over: render each scene once
            self.cache[i] = make_sample(self.task, self.seed, i, **self.kw)
        return self.cache[i]


def add_world_args(p, shown=True):
    """The synthetic world's flags, declared once for train.py and eval.py (give both the same).
    shown=False: in --help-all only (train.py -h keeps to one screen). --frames is not here: it
    also sets the frames per video of real data."""
    h = (lambda text: text) if shown else (lambda text: argparse.SUPPRESS)
    g = p.add_argument_group("synthetic scenes (train.py and eval.py take the same)").add_argument
    g("--image-size", type=int, default=56, help=h("frame size in pixels (a loaded model resizes "
      "frames to its own width and says so)"))
    g("--pitch", type=float, default=0.0, help=h("camera pitch, deg (0: level, one box angle)"))
    g("--max-objects", type=int, default=1, help=h("objects per scene, at most (1: the learnable "
      "default; 3: multi-object scenes the tiny model does not bind; README)"))
    g("--spelling", type=str, choices=["canonical", "random"], default="canonical",
      help=h("target boxes/order spelled one way, or a random one of the equivalent spellings"))


def world(args):
    """SyntheticDataset's world keywords from the flags of add_world_args (and --frames)."""
    return dict(frames=args.frames, size=args.image_size, pitch=args.pitch,
                max_objects=args.max_objects, spelling=args.spelling)


def image_size_note(model, size):
    """What to say when a loaded model resizes frames of --image-size to its own width, or None."""
    width = model.config["image_width"]
    return None if width == size else (f"--image-size {size}: this model resizes every frame to "
                                       f"{width} px wide (its config's image_width)")


# --------------------------------------------------------------------------------------------------
# 4. Command line: python scenes.py show|export|speed
# --------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="rft3d synthetic data: export to VG-LLM layout, or "
                                             "show a sample")
    ap.add_argument("command", choices=["export", "show", "speed"])
    ap.add_argument("--task", choices=TASK_NAMES, default="detection")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--max-objects", type=int, default=1)
    ap.add_argument("--image-format", choices=["png", "jpg"], default="png")
    ap.add_argument("--out", default="out/synthetic")
    a = ap.parse_args(argv)
    ds = SyntheticDataset(a.task, a.n, a.seed, frames=a.frames, size=a.size,
                          max_objects=a.max_objects)
    if a.command == "export":
        path = data.export_vgllm(ds, a.out, a.image_format)
        print("wrote", path, f"({a.n} rows, media under {a.out}/media)")
    elif a.command == "speed":
        t = time.perf_counter()
        for i in range(a.n):
            ds[i]
        dt = time.perf_counter() - t
        print(f"{a.task}: {a.n} samples in {dt:.2f} s = {a.n / dt:.0f} samples/s")
    else:
        s = ds[a.index]
        if s.task == "detection":
            img = data.draw_boxes(s.frames, s.intrinsics, s.cam2global, s.boxes)
        else:   # grounding: the target; spatial: every object (both in the aligned world)
            world = [s.world_box] if s.task == "grounding" else [
                {"label": o["label"], "bbox_3d": o["box"]} for o in s.meta["objects"]]
            img = data.draw_boxes(s.frames, s.intrinsics, s.cam2global, world, box_frame="world",
                                  axis_align=s.axis_align)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        img.save(a.out)
        print(f"{s.id}: {len(s.frames)} frames {s.frames.shape[1:3]} -> {a.out}")
        for k in ("boxes", "description", "target_frame", "target_box", "question", "options",
                  "ground_truth"):
            if getattr(s, k) not in (None, "", []):
                print(f"  {k}: {getattr(s, k)}")


if __name__ == "__main__":
    main()
