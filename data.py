"""Samples for rft3d: synthetic 3D scenes rendered by our own numpy ray caster, and readers for real data.

A Sample is frames (uint8 [S,H,W,3]) + camera poses + exact ground truth for one of three tasks:
  detection   9-DoF boxes [cx,cy,cz,dx,dy,dz,a,b,c] with labels, in the FIRST frame's camera coordinates
  grounding   a referring expression -> target frame k + box in camera k (and the box in the aligned world)
  spatial     a VSI-Bench-style question with options (multiple choice) or a numeric answer
Conventions (DESIGN.md section 3): R = Rz(a) @ Rx(b) @ Ry(c); OpenCV cameras (x right, y down, z forward);
cam2global[k] is camera k -> raw world and E_k = axis_align @ cam2global[k] is camera k -> aligned world.

Sections: 1. Sample + box geometry   2. synthetic scenes (layout, cameras, renderer)   3. ground truth per task
4. SyntheticDataset   5. real readers (VG-LLM JSON, VSI-Bench, ScanNet posed folders)   6. export, drawing, CLI
This file imports nothing of ours.
"""
import argparse, itertools, json, math, os, re, sys, time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------
# 1. Sample and box geometry
# ----------------------------------------------------------------------------------------------------------
TASK_NAMES = ("detection", "grounding", "spatial")


@dataclass
class Sample:
    id: str
    task: str
    frames: np.ndarray                       # uint8 [S,H,W,3]
    intrinsics: np.ndarray | None = None     # [3,3] pinhole K (None when unknown)
    cam2global: np.ndarray | None = None     # [S,4,4] camera -> raw world (None when unknown)
    axis_align: np.ndarray = field(default_factory=lambda: np.eye(4))  # [4,4] raw world -> aligned world
    boxes: list = field(default_factory=list)  # detection: [{"label", "bbox_3d"}] in first-frame camera coords
    description: str = ""                    # grounding: referring expression
    target_frame: int = -1                   # grounding: frame index (-1 when the data has none)
    target_box: list = field(default_factory=list)  # grounding: 9 floats in camera target_frame
    world_box: list = field(default_factory=list)   # grounding: 9 floats in the aligned world
    question: str = ""                       # spatial: the question (no pre/post prompt)
    options: list = field(default_factory=list)     # spatial: ["A. left", "B. right"] or [] for numbers
    ground_truth: str = ""                   # spatial: option letter or number as a string
    question_type: str = ""                  # spatial: VSI-Bench question type
    meta: dict = field(default_factory=dict)  # free: scene objects, room, unique flag, ...


def euler_to_matrix(a, b, c):
    """R = Rz(a) @ Rx(b) @ Ry(c) (intrinsic Z-X-Y)."""
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    Rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1.0]])
    Rx = np.array([[1.0, 0, 0], [0, cb, -sb], [0, sb, cb]])
    Ry = np.array([[cc, 0, sc], [0, 1.0, 0], [-sc, 0, cc]])
    return Rz @ Rx @ Ry


def matrix_to_euler(R):
    """Inverse of euler_to_matrix. Written out, R[2] = [-cos b sin c, sin b, cos b cos c],
    R[0,1] = -sin a cos b, R[1,1] = cos a cos b. At gimbal lock (cos b = 0) we set c = 0."""
    b = math.asin(max(-1.0, min(1.0, R[2, 1])))
    if abs(R[2, 1]) < 1 - 1e-9:
        return math.atan2(-R[0, 1], R[1, 1]), b, math.atan2(-R[2, 0], R[2, 2])
    return math.atan2(R[1, 0], R[0, 0]), b, 0.0


def transform_box(box, T):
    """Move a 9-DoF box by the rigid 4x4 transform T (centre T@[c,1], rotation T[:3,:3]@R, sizes kept)."""
    box = [float(x) for x in box]
    c = T[:3, :3] @ np.array(box[:3]) + T[:3, 3]
    return [*map(float, c), *box[3:6], *matrix_to_euler(T[:3, :3] @ euler_to_matrix(*box[6:9]))]


def box_corners(box):
    """[8,3] corners centre + R @ (size * (u - 0.5)); corner index = 4*ux + 2*uy + uz."""
    u = np.array(list(itertools.product((0, 1), repeat=3)), float)
    return np.asarray(box[:3], float) + ((u - 0.5) * np.asarray(box[3:6], float)) @ euler_to_matrix(*box[6:9]).T


# ----------------------------------------------------------------------------------------------------------
# 2. Synthetic scenes: a room (checkered floor, walls) with upright boxes and cylinders on the floor
# ----------------------------------------------------------------------------------------------------------
# name, colour, shape, size ranges (x, y, z) in metres; a cylinder's x = y = diameter and its yaw is 0 (a
# cylinder's yaw cannot be seen). Each category has its own colour, so a tiny model can tell them apart.
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
    if np.all(edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0] >= 0):   # inside (counter-clockwise corners)
        return 0.0
    t = np.clip((rel * edges).sum(1) / (edges ** 2).sum(1), 0, 1)
    return float(np.min(np.linalg.norm(rel - t[:, None] * edges, axis=1)))


def footprint_distance(o1, o2):
    """Closest-point distance between two objects standing on the floor (0 if they touch). Both start at
    z = 0, so their height ranges overlap and the 3D closest-point distance is the 2D footprint distance."""
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


def look_at(eye, target):
    """4x4 OpenCV camera-to-world for a camera at eye looking at target, world z up."""
    f = target - eye
    f = f / np.linalg.norm(f)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r = r / np.linalg.norm(r)
    T = np.eye(4)
    T[:3, :3] = np.stack([r, np.cross(f, r), f], 1)   # columns: x right, y down, z forward
    T[:3, 3] = eye
    return T


def make_scene(rng, n_objects, frames, camera="orbit", motion=None, gap=0.1):
    """Objects (aligned world, upright, non-interpenetrating footprints), room and camera poses.
    orbit: the camera circles the objects by `motion` radians (default 0.6) looking at their centre.
    pan:   the camera stands still and turns by `motion` radians (default 2.0) across objects spread
           around it, so objects enter the view one after another (used for appearance order)."""
    objects, tries = [], 0
    while len(objects) < n_objects and tries < 200:
        tries += 1
        name, colour, rgb, shape, rx, ry, rz = CATEGORIES[rng.integers(len(CATEGORIES))]
        dx, dz = rng.uniform(*rx), rng.uniform(*rz)
        dy, yaw = (dx, 0.0) if shape == "cylinder" else (rng.uniform(*ry), rng.uniform(-math.pi / 2, math.pi / 2))
        if camera == "pan":   # spread around a camera at the origin facing +x
            ang, dist = rng.uniform(-1.3, 1.3), rng.uniform(1.8, 3.0)
            xy = dist * np.array([math.cos(ang), math.sin(ang)])
        else:                 # within a disc around the origin
            ang, dist = rng.uniform(-math.pi, math.pi), 1.2 * math.sqrt(rng.uniform())
            xy = dist * np.array([math.cos(ang), math.sin(ang)])
        o = {"label": name, "shape": shape, "box": [xy[0], xy[1], dz / 2, dx, dy, dz, yaw, 0.0, 0.0]}
        if all(footprint_distance(o, p) > gap for p in objects):
            objects.append(o)
    S = frames
    s = np.linspace(-0.5, 0.5, S) if S > 1 else np.zeros(1)
    height = rng.uniform(1.3, 1.8)
    if camera == "pan":
        eye = np.array([0.0, 0.0, height])
        heading = (motion if motion is not None else 2.0) * s + rng.uniform(-0.1, 0.1)
        targets = np.stack([2.4 * np.cos(heading), 2.4 * np.sin(heading), np.full(S, 0.4)], 1)
        c2w = np.stack([look_at(eye, t) for t in targets])
    else:
        centre = np.mean([o["box"][:2] for o in objects], 0) if objects else np.zeros(2)
        radius, phi0 = rng.uniform(2.2, 3.0), rng.uniform(-math.pi, math.pi)
        phi = phi0 + (motion if motion is not None else 0.6) * s
        c2w = []
        for k in range(S):
            eye = np.array([centre[0] + radius * math.cos(phi[k]), centre[1] + radius * math.sin(phi[k]), height])
            target = np.array([*(centre + rng.uniform(-0.2, 0.2, 2)), 0.4])
            c2w.append(look_at(eye + rng.uniform(-0.05, 0.05, 3), target))
        c2w = np.stack(c2w)
    # room: the bounding rectangle of objects and cameras plus random margins; then shift so that the room's
    # corner is the aligned world origin (like ScanNet's axis-aligned frame, floor at z = 0)
    pts = np.concatenate([c2w[:, :2, 3]] + [footprint_corners(o) for o in objects])
    lo = pts.min(0) - rng.uniform(0.4, 1.5, 2)
    hi = pts.max(0) + rng.uniform(0.4, 1.5, 2)
    for o in objects:
        o["box"][0] -= lo[0]
        o["box"][1] -= lo[1]
        o["box"] = [float(x) for x in o["box"]]
    c2w[:, :2, 3] -= lo
    return {"objects": objects, "room": [0.0, 0.0, float(hi[0] - lo[0]), float(hi[1] - lo[1]), WALL_HEIGHT],
            "c2w": c2w}


def footprint_corners(o):
    f = footprint(o)
    return f[1] if f[0] == "poly" else f[1] + f[2] * np.array([[1, 0], [-1, 0], [0, 1], [0, -1.0]])


def intrinsics_for(H, W):
    """Pinhole K with a ~67 degree horizontal field of view."""
    f = 0.75 * W
    return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])


def _hit(ob, ol, dl):
    """Ray parameter t of the first hit with an object, inf on a miss. Object-local rays: origins ol [S,1,3],
    directions dl [S,N,3]."""
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
    ts = np.where((disc > 0) & (ts > 0) & (np.abs(ol[..., 2] + ts * dl[..., 2]) <= half[2]), ts, np.inf)
    tc = (np.where(dl[..., 2] < 0, half[2], -half[2]) - ol[..., 2]) / dl[..., 2]
    pc = ol[..., :2] + tc[..., None] * dl[..., :2]
    return np.minimum(ts, np.where(((pc ** 2).sum(-1) <= r * r) & (tc > 0), tc, np.inf))


def _normal(ob, p):
    """Object-local outward normals at surface points p [M,3]: the face whose surface p is closest to."""
    half = np.array(ob["box"][3:6]) / 2
    if ob["shape"] == "box":
        axis = np.argmax(np.abs(p) / half, 1)
        return np.eye(3)[axis] * np.sign(p[np.arange(len(p)), axis])[:, None]
    radial = np.linalg.norm(p[:, :2], axis=1)
    cap = np.abs(p[:, 2]) / half[2] >= radial / half[0]
    side = np.concatenate([p[:, :2] / np.maximum(radial, 1e-9)[:, None], np.zeros((len(p), 1))], 1)
    return np.where(cap[:, None], np.array([0, 0, 1.0]) * np.sign(p[:, 2:3]), side)


def render(scene, K, H, W):
    """Ray cast all frames at once. Returns images uint8 [S,H,W,3] and an object-id buffer int16 [S,H,W]
    (object index, -1 floor, -2 wall, -3 ceiling). scene["c2w"] is camera -> aligned world."""
    c2w, objects = scene["c2w"], scene["objects"]
    S = len(c2w)
    v, u = np.mgrid[0:H, 0:W] + 0.5
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    d = d_cam @ c2w[:, :3, :3].transpose(0, 2, 1)                   # [S,N,3] ray directions (world)
    o = c2w[:, None, :3, 3]                                         # [S,1,3] ray origins: camera centres
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


# ----------------------------------------------------------------------------------------------------------
# 3. Ground truth for the three tasks
# ----------------------------------------------------------------------------------------------------------
SPATIAL_TYPES = ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
                 "object_rel_distance", "object_rel_direction_easy", "object_rel_direction_medium",
                 "object_rel_direction_hard", "obj_appearance_order")
NEEDS = {"grounding": 1, "object_counting": 1, "object_size_estimation": 1, "object_abs_distance": 2,
         "object_rel_distance": 3, "obj_appearance_order": 3, "object_rel_direction_easy": 3,
         "object_rel_direction_medium": 3, "object_rel_direction_hard": 3}   # objects needed at least
LETTERS = "ABCDEFGH"


def _mc(rng, correct, wrong):
    """Shuffle the correct answer among the wrong ones -> (["A. ..", ..], letter)."""
    opts = [correct] + list(wrong)
    order = rng.permutation(len(opts))
    return [f"{LETTERS[i]}. {opts[j]}" for i, j in enumerate(order)], LETTERS[int(np.argmin(order))]


def direction_angle(p, o, q):
    """Signed angle (degrees, counter-clockwise = left) of q seen from p while facing o, on the floor plane."""
    f, v = np.subtract(o[:2], p[:2]), np.subtract(q[:2], p[:2])
    return math.degrees(math.atan2(f[0] * v[1] - f[1] * v[0], f @ v))


def spatial_question(rng, qtype, objects, room, first_seen):
    """(question, options, ground_truth) for a VSI-Bench question type, or None when this scene cannot pose
    it unambiguously. Only objects whose category is unique in the scene are referred to by name."""
    labels = [o["label"] for o in objects]
    uniq = [o for o in objects if labels.count(o["label"]) == 1]
    pick = lambda k: [uniq[i] for i in rng.permutation(len(uniq))[:k]]
    if qtype == "object_counting":
        cat = sorted(set(labels))[rng.integers(len(set(labels)))]
        return f"How many {cat}(s) can be found in this room?", [], str(labels.count(cat))
    if qtype == "object_size_estimation" and uniq:
        o = pick(1)[0]
        q = f"How long is the longest side (length, width or height) of the {o['label']}, in centimeters?"
        return q, [], str(round(max(o["box"][3:6]) * 100))
    if qtype == "room_size_estimation":
        return "How large is the floor area of this room, in square meters?", [], f"{room[2] * room[3]:.1f}"
    if qtype == "object_abs_distance" and len(uniq) >= 2:
        a, b = pick(2)
        dist = footprint_distance(a, b)
        if dist >= 0.2:
            q = (f"Measured between the closest points of the two objects, how far apart are the {a['label']} "
                 f"and the {b['label']} (in meters)?")
            return q, [], f"{dist:.2f}"
    if qtype == "object_rel_distance" and len(uniq) >= 3:
        query, *choices = pick(5)
        dist = sorted((footprint_distance(query, c), c["label"]) for c in choices)
        if dist[1][0] - dist[0][0] >= 0.15:
            options, gt = _mc(rng, dist[0][1], [n for _, n in dist[1:]])
            names = ", ".join(x[3:] for x in options)
            return (f"Measured between closest points, which of these objects ({names}) is nearest to the "
                    f"{query['label']}?", options, gt)
    if qtype.startswith("object_rel_direction") and len(uniq) >= 3:
        p, o, q = pick(3)
        if np.linalg.norm(np.subtract(o["box"][:2], p["box"][:2])) < 0.3 or \
           np.linalg.norm(np.subtract(q["box"][:2], p["box"][:2])) < 0.3:
            return None
        ang = direction_angle(p["box"], o["box"], q["box"])
        stem = f"Standing next to the {p['label']} and looking toward the {o['label']}, is the {q['label']}"
        if qtype.endswith("easy") and 15 < abs(ang) < 165:
            return (f"{stem} on the left or on the right of the {o['label']}?",
                    *_mc(rng, "left" if ang > 0 else "right", ["right" if ang > 0 else "left"]))
        if qtype.endswith("medium") and abs(ang) > 15 and abs(abs(ang) - 135) > 10:
            ans = "back" if abs(ang) >= 135 else ("left" if ang > 0 else "right")
            return (f"{stem} on my left, on my right, or behind me? Something is behind me if I would need to turn "
                    f"by 135 degrees or more to face it.", *_mc(rng, ans, [w for w in ("left", "right", "back")
                                                                         if w != ans]))
        if qtype.endswith("hard") and min(abs(ang - x) for x in (-180, -90, 0, 90, 180)) > 10:
            ans = ("front" if abs(ang) < 90 else "back") + ("-left" if ang > 0 else "-right")
            quads = ["front-left", "front-right", "back-left", "back-right"]
            return (f"{stem} to my front-left, front-right, back-left or back-right? Think of the quadrants of a "
                    f"plane where I stand at the origin and face the positive y-axis.",
                    *_mc(rng, ans, [w for w in quads if w != ans]))
    if qtype == "obj_appearance_order":
        seen = sorted((first_seen[i], o["label"]) for i, o in enumerate(objects) if labels.count(o["label"]) == 1)
        firsts = [f for f, _ in seen]
        seen = [s for s in seen if firsts.count(s[0]) == 1][:4]   # each category must first appear alone
        if len(seen) >= 3:
            order = [n for _, n in seen]
            perms = [list(p) for p in itertools.permutations(order) if list(p) != order]
            wrong = [", ".join(perms[i]) for i in rng.permutation(len(perms))[:3]]
            options, gt = _mc(rng, ", ".join(order), wrong)
            cats = ", ".join(order[i] for i in rng.permutation(len(order)))
            return f"In what order do these categories first appear in the video: {cats}?", options, gt
    return None


def grounding_expression(rng, objects, t):
    """An unambiguous referring expression for objects[t], or None."""
    o = objects[t]
    name, colour, shape = o["label"], CAT[o["label"]][1], o["shape"]
    same = [p for p in objects if p["label"] == name and p is not o]
    if not same:
        return [f"The {name}.", f"The {colour} {shape}.", f"The {colour} {name} in the room."][rng.integers(3)]
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


def make_sample(task, seed, index, frames=4, size=56, min_objects=1, max_objects=3, camera="orbit",
                motion=None, question_types=SPATIAL_TYPES, min_pixels=6, axis_align=True):
    """Sample `index` of the synthetic set `seed`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    H, W = (size, size) if isinstance(size, int) else size
    K = intrinsics_for(H, W)
    qtypes = list(question_types)
    qtype = qtypes[rng.integers(len(qtypes))] if task == "spatial" else None
    for attempt in range(60):
        if task == "spatial" and attempt and attempt % 20 == 0:   # this type does not fit: take the next one
            qtype = qtypes[(qtypes.index(qtype) + 1) % len(qtypes)]
        lo = max(min_objects, NEEDS.get(qtype or task, 0))
        cam = "pan" if qtype == "obj_appearance_order" else camera
        scene = make_scene(rng, int(rng.integers(lo, max(lo, max_objects) + 1)), frames, cam, motion)
        img, ids = render(scene, K, H, W)
        seen = [j for j in range(len(scene["objects"])) if (ids == j).sum((1, 2)).max() >= min_pixels]
        if len(seen) < len(scene["objects"]):   # remove what no frame sees (< min_pixels), render again
            scene["objects"] = [scene["objects"][j] for j in seen]
            img, ids = render(scene, K, H, W)
        objects = scene["objects"]
        px = np.array([(ids == j).sum((1, 2)) for j in range(len(objects))], int).reshape(-1, frames)  # [n, S]
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
        raise RuntimeError(f"synthetic sample {seed}/{index} ({task}, {qtype}) found no valid scene")
    # a random raw-world frame: cam2global is camera -> raw world, axis_align maps raw -> aligned (the room)
    A = np.eye(4)
    if axis_align:
        th = rng.uniform(-math.pi, math.pi)
        A[:3, :3] = euler_to_matrix(th, 0, 0)
        A[:2, 3] = rng.uniform(-3, 3, 2)
    cam2global = np.linalg.inv(A) @ scene["c2w"]
    meta = {"objects": objects, "room": scene["room"], "pixels": px.tolist(), "scene": f"syn{seed}_{index:07d}"}
    s = Sample(id=f"synthetic-{task}-{seed}-{index}", task=task, frames=img, intrinsics=K,
               cam2global=cam2global, axis_align=A, meta=meta)
    if task == "detection":   # sorted left to right in the first camera: a canonical, learnable order
        to_cam0 = np.linalg.inv(scene["c2w"][0])
        boxes = [{"label": o["label"], "bbox_3d": transform_box(o["box"], to_cam0)} for o in objects]
        s.boxes = sorted(boxes, key=lambda b: b["bbox_3d"][0])
    elif task == "grounding":
        k = int(np.argmax(px[t]))   # the sampled frame where the target covers the most pixels
        s.description, s.target_frame, s.world_box = desc, k, objects[t]["box"]
        s.target_box = transform_box(objects[t]["box"], np.linalg.inv(scene["c2w"][k]))
        meta.update(label=objects[t]["label"], target=t,
                    unique=sum(o["label"] == objects[t]["label"] for o in objects) == 1)
    else:
        s.question, s.options, s.ground_truth = qa
        s.question_type = qtype
    return s


# ----------------------------------------------------------------------------------------------------------
# 4. SyntheticDataset: item i is a pure function of (seed, i); "infinite fresh data" = huge n or a new seed
# ----------------------------------------------------------------------------------------------------------
class SyntheticDataset(torch.utils.data.Dataset):
    def __init__(self, task, n, seed=0, frames=4, size=56, min_objects=1, max_objects=3, camera="orbit",
                 motion=None, question_types=SPATIAL_TYPES, min_pixels=6, axis_align=True):
        assert task in TASK_NAMES, task
        self.task, self.n, self.seed = task, n, seed
        self.kw = dict(frames=frames, size=size, min_objects=min_objects, max_objects=max_objects, camera=camera,
                       motion=motion, question_types=tuple(question_types), min_pixels=min_pixels,
                       axis_align=axis_align)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return make_sample(self.task, self.seed, i, **self.kw)


def collate(batch):
    """Samples stay a list: frames differ in size across sources and model.py does the pixel work."""
    return list(batch)


# ----------------------------------------------------------------------------------------------------------
# 5. Real data: VG-LLM JSON (ScanNet detection, ScanRefer), VSI-Bench, ScanNet posed-image folders
# ----------------------------------------------------------------------------------------------------------
def frame_indices(N, n):
    """Uniform sampling over a video's N frames (all of them when n is None or n >= N)."""
    return np.arange(N) if n is None or n >= N else np.round(np.linspace(0, N - 1, n)).astype(int)


def read_image(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _stack(images, where):
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{where}: frames differ in size: {sorted({im.shape for im in images})}")
    return np.stack(images)


def read_video(path, n):
    """n uniformly sampled frames of a video through PyAV (optional dependency)."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyAV: pip install av (or give a folder of frames)") from e
    with av.open(path) as c:
        N = c.streams.video[0].frames or sum(1 for _ in c.decode(video=0))
    want, out = set(frame_indices(N, n).tolist()), {}
    with av.open(path) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i in want:
                out[i] = fr.to_ndarray(format="rgb24")
    return np.stack([out[i] for i in frame_indices(N, n) if i in out])


def _matrix(x, shape, what):
    m = np.asarray(x, dtype=np.float64)
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise ValueError(f"{what} must be a finite array of shape {shape}, got {np.shape(x)}")
    return m


def read_posed_folder(folder, n=None):
    """ScanNet posed images: {frame:05d}.jpg (or .png) + {frame:05d}.txt (4x4 camera-to-world), optional
    intrinsic.txt. Frames whose pose has inf/nan (ScanNet has some) are skipped before sampling.
    Returns (frames [n,H,W,3], cam2global [n,4,4] or None, intrinsics [3,3] or None, file names)."""
    names = [f for f in os.listdir(folder) if re.fullmatch(r"\d+\.(jpg|jpeg|png)", f.lower())]
    if any(not f.lower().endswith(".png") for f in names):   # ScanNet keeps depth as {frame}.png beside
        names = [f for f in names if not f.lower().endswith(".png")]
    names = sorted(names, key=lambda f: int(f.split(".")[0]))
    has_pose = any(os.path.exists(os.path.join(folder, f.split(".")[0] + ".txt")) for f in names)
    poses = {}
    if has_pose:
        for f in names:
            p = os.path.join(folder, f.split(".")[0] + ".txt")
            m = np.loadtxt(p).reshape(-1) if os.path.exists(p) else np.full(16, np.nan)
            if m.size == 16 and np.all(np.isfinite(m)):
                poses[f] = m.reshape(4, 4)
        names = [f for f in names if f in poses]
    if not names:
        raise ValueError(f"{folder}: no frames (with valid poses)")
    names = [names[i] for i in frame_indices(len(names), n)]
    frames = _stack([read_image(os.path.join(folder, f)) for f in names], folder)
    K = None
    for kname in ("intrinsic.txt", "intrinsic_color.txt", os.path.join("intrinsic", "intrinsic_color.txt")):
        if os.path.exists(os.path.join(folder, kname)):
            K = np.loadtxt(os.path.join(folder, kname))[:3, :3]
            break
    return frames, (np.stack([poses[f] for f in names]) if has_pose else None), K, names


def read_rows(path):
    """Rows of a JSON list, JSONL or parquet (pyarrow, imported lazily) file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or use the JSON/JSONL)") from e
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        if path.endswith(".jsonl"):
            rows = []
            for line in filter(str.strip, f):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(ValueError(f"not JSON: {e}"))   # reported with its row number below
            return rows
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return rows


def _box9(x, what):
    if not (isinstance(x, (list, tuple)) and len(x) == 9 and all(isinstance(v, (int, float)) for v in x)
            and all(math.isfinite(v) for v in x)):
        raise ValueError(f"{what} must be 9 finite numbers, got {x!r}")
    return [float(v) for v in x]


def _spec_vgllm(task, row, media_root, frames):
    """Check one VG-LLM row and turn it into a spec (paths checked, media not read yet)."""
    if not isinstance(row, dict):
        raise ValueError(f"row is not an object: {row!r:.80}")
    images = row["images"]
    if not (isinstance(images, list) and images and all(isinstance(p, str) for p in images)):
        raise ValueError("'images' must be a non-empty list of paths")
    paths = [os.path.join(media_root, p) for p in images]
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"missing image file {p}")
    S = len(paths)
    keep = frame_indices(S, frames)
    spec = {"task": task, "paths": [paths[i] for i in keep], "meta": dict(row.get("metadata") or {})}
    c2g = row.get("cam2global")
    spec["cam2global"] = _matrix(c2g, (S, 4, 4), "cam2global")[keep] if c2g is not None else None
    spec["axis_align"] = _matrix(row.get("axis_align_matrix", np.eye(4)), (4, 4), "axis_align_matrix")
    K = row.get("cam2img")   # 4x4 in VG-LLM's rows (3x3 accepted)
    spec["intrinsics"] = None if K is None else _matrix(K, np.shape(K) if np.shape(K) == (3, 3) else (4, 4),
                                                        "cam2img")[:3, :3]
    if task == "detection":
        if not isinstance(row["boxes"], list):
            raise ValueError("'boxes' must be a list")
        spec["boxes"] = [{"label": str(b["label"]), "bbox_3d": _box9(b["bbox_3d"], "boxes[].bbox_3d")}
                         for b in row["boxes"]]
        if keep[0] != 0:
            raise ValueError("detection frames must keep the first frame")
    else:
        text = row.get("description") or row.get("prompt") or row["conversations"][0]["value"]
        m = re.search(r"Text: (.*)\n", text)
        spec["description"] = row.get("description") or (m.group(1) if m else None)
        if not spec["description"]:
            raise ValueError("no description ('Text: ...' line in the prompt)")
        spec["world_box"] = _box9(row["gt_bbox"], "gt_bbox")
        target = row.get("target")
        if target is not None:   # train rows: frame + box; val rows have no frame (target None)
            if not isinstance(target.get("frame"), int) or not 0 <= target["frame"] < S:
                raise ValueError(f"target frame must be an int in [0, {S}), got {target.get('frame')!r}")
            k = int(np.argmin(np.abs(keep - target["frame"])))   # nearest kept frame when subsampling
            spec["target_frame"], spec["target_box"] = k, _box9(target["bbox_3d"], "target.bbox_3d")
            if keep[k] != target["frame"]:   # the box must move to the kept frame's camera
                if spec["cam2global"] is None:
                    raise ValueError("subsampling a grounding row needs 'cam2global'")
                E = spec["axis_align"] @ spec["cam2global"][k]
                spec["target_box"] = transform_box(spec["world_box"], np.linalg.inv(E))
        elif spec["cam2global"] is None:
            raise ValueError("a grounding row needs a 'target' or 'cam2global' (to score boxes)")
        qt = spec["meta"].get("question_type")
        spec["meta"]["unique"] = None if qt not in ("unique", "multiple") else qt == "unique"
    return spec


def _spec_vsi(row, media_root, frames):
    if not isinstance(row, dict):
        raise ValueError(f"row is not an object: {row!r:.80}")
    for k in ("dataset", "scene_name", "question_type", "question", "ground_truth"):
        if not isinstance(row.get(k), (str, int, float)) or row.get(k) == "":
            raise ValueError(f"missing or empty field {k!r}")
    options = list(row.get("options") or [])
    if row["question_type"] not in SPATIAL_TYPES + ("route_planning",):
        raise ValueError(f"unknown question_type {row['question_type']!r}")
    video = os.path.join(media_root, str(row["dataset"]), f"{row['scene_name']}.mp4")
    folder = os.path.join(media_root, str(row["dataset"]), str(row["scene_name"]))
    if not os.path.exists(video) and not os.path.isdir(folder):
        raise ValueError(f"missing video {video} (or frame folder {folder})")
    return {"task": "spatial", "video": video if os.path.exists(video) else None, "folder": folder,
            "frames": 32 if frames is None else frames, "question": str(row["question"]), "options": options,
            "ground_truth": str(row["ground_truth"]), "question_type": row["question_type"],
            "axis_align": _matrix(row.get("axis_align_matrix", np.eye(4)), (4, 4), "axis_align_matrix"),
            "meta": {"dataset": row["dataset"], "scene_name": row["scene_name"], **(row.get("metadata") or {})}}


class RowDataset(torch.utils.data.Dataset):
    """Checked rows of a real data file; media are read in __getitem__ (DataLoader workers welcome)."""

    def __init__(self, task, path, media_root=None, frames=None, skip_bad=False):
        assert task in TASK_NAMES, task
        if media_root is None:   # our export's layout: the JSON next to a media/ folder
            media_root = os.path.join(os.path.dirname(path), "media")
            media_root = media_root if os.path.isdir(media_root) else os.path.dirname(path)
        self.path, self.specs, self.n_skipped = path, [], 0
        for i, row in enumerate(read_rows(path)):
            try:
                if isinstance(row, Exception):
                    raise row
                spec = _spec_vsi(row, media_root, frames) if task == "spatial" else \
                    _spec_vgllm(task, row, media_root, frames)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                msg = f"{path}: row {i}: {type(e).__name__}: {e}"
                if not skip_bad:
                    raise ValueError(msg) from e
                self.n_skipped += 1
                continue
            spec["id"], spec["row"] = str(row.get("id", f"{os.path.basename(path)}:{i}")), i
            self.specs.append(spec)
        if self.n_skipped:
            print(f"data: skipped {self.n_skipped} bad rows of {path}", file=sys.stderr)

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        sp = self.specs[i]
        where = f"{self.path}: row {sp['row']}"
        try:
            if sp["task"] == "spatial":
                if sp["video"]:
                    frames, c2g, K = read_video(sp["video"], sp["frames"]), None, None
                else:
                    frames, c2g, K, _ = read_posed_folder(sp["folder"], sp["frames"])
            else:
                frames, c2g, K = _stack([read_image(p) for p in sp["paths"]], where), sp["cam2global"], \
                    sp["intrinsics"]
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read media: {e}") from e
        keys = ("boxes", "description", "target_frame", "target_box", "world_box", "question", "options",
                "ground_truth", "question_type")
        return Sample(id=sp["id"], task=sp["task"], frames=frames, intrinsics=K, cam2global=c2g,
                      axis_align=sp["axis_align"], meta=dict(sp["meta"]), **{k: sp[k] for k in keys if k in sp})


def load_dataset(task, path, media_root=None, frames=None, skip_bad=False):
    """A Dataset of Samples from a VG-LLM JSON (detection: scannet_det_*.json, grounding: scanrefer_*.json;
    image paths relative to media_root) or VSI-Bench rows (spatial: JSON/JSONL/parquet; video at
    {media_root}/{dataset}/{scene_name}.mp4 or a frame folder {dataset}/{scene_name}/). frames: uniformly
    subsample a row's images to this many (None = all; 32 for videos). A bad row raises a ValueError naming
    the file and row; with skip_bad=True it is skipped and counted in .n_skipped."""
    return RowDataset(task, path, media_root, frames, skip_bad)


# ----------------------------------------------------------------------------------------------------------
# 6. Export to VG-LLM / VSI-Bench layouts, drawing boxes, command line
# ----------------------------------------------------------------------------------------------------------
DET_TEXT = ("Detect the 3D bounding boxes in the camera coordinate system of the first frame.\n"
            "Output a json list where each entry contains the object name in \"label\" and its 3D bounding box in "
            "\"bbox_3d\".\nThe 3D bounding box format should be [x_center, y_center, z_center, x_size, y_size, "
            "z_size, yaw, roll, pitch].")
GROUND_TEXT = ("Localize the first clear frame in the video showing the object described in the text.\n"
               "Text: {}\nOutput a JSON dictionary with the frame index in \"frame\" and its 3D bounding box in "
               "\"bbox_3d\" in the frame's coordinates.\n")


def export_vgllm(dataset, out_dir, image_format="png"):
    """Write a dataset as VG-LLM JSON (detection.json, grounding.json) or VSI-Bench JSONL (spatial.jsonl) +
    media/synthetic/{scene}/{k:05d}.{png|jpg} with {k:05d}.txt poses and intrinsic.txt (a ScanNet posed
    folder). Image paths in rows are relative to out_dir/media. PNG keeps the round trip exact."""
    if len(dataset) == 0:
        raise ValueError("nothing to export: the dataset is empty")
    rows = []
    for i in range(len(dataset)):
        s = dataset[i]
        scene = re.sub(r"[^A-Za-z0-9_.-]", "_", s.id)
        folder = os.path.join(out_dir, "media", "synthetic", scene)
        os.makedirs(folder, exist_ok=True)
        images = []
        for k, fr in enumerate(s.frames):
            Image.fromarray(fr).save(os.path.join(folder, f"{k:05d}.{image_format}"), quality=95)
            if s.cam2global is not None:
                np.savetxt(os.path.join(folder, f"{k:05d}.txt"), s.cam2global[k])
            images.append(f"synthetic/{scene}/{k:05d}.{image_format}")
        if s.intrinsics is not None:
            np.savetxt(os.path.join(folder, "intrinsic.txt"), s.intrinsics)
        r2 = lambda box: [round(float(x), 2) for x in box]
        meta = {"dataset": "synthetic", "scene": scene,   # + what the synthetic scene knows (objects, room, ...)
                **{k: s.meta[k] for k in ("objects", "room", "label", "target") if k in s.meta}}
        K4 = np.eye(4)
        K4[:3, :3] = s.intrinsics if s.intrinsics is not None else np.eye(3)
        cams = {"cam2img": K4.tolist() if s.intrinsics is not None else None,
                "cam2global": s.cam2global.tolist(), "axis_align_matrix": s.axis_align.tolist()}
        if s.task == "detection":
            answer = "```json\n[\n\t" + ",\n\t".join(json.dumps({"label": b["label"], "bbox_3d": r2(b["bbox_3d"])})
                                                     for b in s.boxes) + "\n]```"
            rows.append({"id": s.id, "images": images, "conversations": [
                {"from": "human", "value": "<image>\n" * len(images) + DET_TEXT}, {"from": "gpt", "value": answer}],
                "boxes": s.boxes, **cams, "metadata": meta})
        elif s.task == "grounding":
            prompt = GROUND_TEXT.format(s.description)
            target = {"frame": s.target_frame, "bbox_3d": s.target_box}
            answer = f"```json\n\t{json.dumps({'frame': s.target_frame, 'bbox_3d': r2(s.target_box)})}\n```"
            tokens = "".join(f"Frame-{k}: <image>" for k in range(len(images)))
            rows.append({"id": s.id, "images": images, "conversations": [
                {"from": "human", "value": f"{tokens}\n{prompt}"}, {"from": "gpt", "value": answer}],
                "metadata": {**meta, "question_type": "unique" if s.meta.get("unique") else "multiple",
                             "object_id": s.meta.get("target")},
                "target": target, "gt_bbox": s.world_box, "prompt": prompt, **cams})
        else:
            rows.append({"id": s.id, "dataset": "synthetic", "scene_name": scene, "question_type": s.question_type,
                         "question": s.question, "options": s.options, "ground_truth": s.ground_truth,
                         "axis_align_matrix": s.axis_align.tolist(), "metadata": meta})
    path = os.path.join(out_dir, "spatial.jsonl" if s.task == "spatial" else f"{s.task}.json")
    with open(path, "w") as f:
        if s.task == "spatial":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return path


EDGES = [(i, i | b) for i in range(8) for b in (1, 2, 4) if not i & b]


def draw_boxes(frames, intrinsics, cam2global, boxes, pred_boxes=(), box_frame=0, axis_align=None, scale=4,
               colors=((60, 255, 60), (255, 60, 255))):
    """Frames side by side (upscaled) with projected 3D box edges: ground truth in colors[0], predictions in
    colors[1]. Boxes ({"label","bbox_3d"} or 9-lists) live in camera `box_frame` or, with box_frame="world",
    in the aligned world (E_k = axis_align @ cam2global[k]); both groups share that frame, so move grounding
    predictions (camera f_pred) to the world first (transform_box(box, axis_align @ cam2global[f_pred])).
    Returns a PIL image."""
    S, H, W = frames.shape[:3]
    canvas = Image.new("RGB", (S * W * scale, H * scale))
    A = np.eye(4) if axis_align is None else np.asarray(axis_align)
    for k in range(S):
        panel = Image.fromarray(frames[k]).resize((W * scale, H * scale), Image.NEAREST)
        draw = ImageDraw.Draw(panel)   # one panel per frame: lines cannot spill into the neighbours
        if intrinsics is not None and (cam2global is not None or box_frame == k):
            if box_frame == "world":
                T = np.linalg.inv(A @ cam2global[k])
            else:   # camera box_frame -> camera k (the axis alignment cancels)
                T = np.eye(4) if cam2global is None else np.linalg.inv(cam2global[k]) @ cam2global[box_frame]
            for group, color in ((boxes, colors[0]), (pred_boxes, colors[1])):
                for b in group:
                    label, box = (b.get("label", ""), b["bbox_3d"]) if isinstance(b, dict) else ("", b)
                    c = box_corners(box) @ T[:3, :3].T + T[:3, 3]            # corners in camera k
                    for i, j in EDGES:
                        p, q = c[i], c[j]
                        if p[2] < 0.05 and q[2] < 0.05:
                            continue
                        if p[2] < 0.05 or q[2] < 0.05:   # clip the edge at the near plane
                            t = (0.05 - p[2]) / (q[2] - p[2])
                            p, q = (p + t * (q - p), q) if p[2] < 0.05 else (p, p + t * (q - p))
                        uv = [tuple((intrinsics @ x)[:2] / x[2] * scale) for x in (p, q)]
                        draw.line(uv, fill=color, width=1)
                    if label and np.all(c[:, 2] > 0.05):
                        uv = (c @ intrinsics.T)[:, :2] / c[:, 2:] * scale
                        draw.text((uv[:, 0].min(), uv[:, 1].min() - 10), label, fill=color)
        canvas.paste(panel, (k * W * scale, 0))
    return canvas


def main(argv=None):
    ap = argparse.ArgumentParser(description="rft3d synthetic data: export to VG-LLM layout, or show a sample")
    ap.add_argument("command", choices=["export", "show", "speed"])
    ap.add_argument("--task", choices=TASK_NAMES, default="detection")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--image-format", choices=["png", "jpg"], default="png")
    ap.add_argument("--out", default="out/synthetic")
    a = ap.parse_args(argv)
    ds = SyntheticDataset(a.task, a.n, a.seed, frames=a.frames, size=a.size, max_objects=a.max_objects)
    if a.command == "export":
        print("wrote", export_vgllm(ds, a.out, a.image_format), f"({a.n} rows, media under {a.out}/media)")
    elif a.command == "speed":
        t = time.perf_counter()
        for i in range(a.n):
            ds[i]
        dt = time.perf_counter() - t
        print(f"{a.task}: {a.n} samples in {dt:.2f} s = {a.n / dt:.0f} samples/s")
    else:
        s = ds[a.index]
        if s.task == "detection":
            img = draw_boxes(s.frames, s.intrinsics, s.cam2global, s.boxes)
        else:   # grounding: the target; spatial: every object of the scene (both in the aligned world)
            world = [s.world_box] if s.task == "grounding" else [
                {"label": o["label"], "bbox_3d": o["box"]} for o in s.meta["objects"]]
            img = draw_boxes(s.frames, s.intrinsics, s.cam2global, world, box_frame="world", axis_align=s.axis_align)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        img.save(a.out)
        print(f"{s.id}: {len(s.frames)} frames {s.frames.shape[1:3]} -> {a.out}")
        for k in ("boxes", "description", "target_frame", "target_box", "question", "options", "ground_truth"):
            if getattr(s, k) not in ("", [], -1):
                print(f"  {k}: {getattr(s, k)}")


if __name__ == "__main__":
    main()
