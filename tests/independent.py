"""Independent geometry for the tests (not data.py's or rewards.py's): rotations by Rodrigues'
formula, box corners, 2D convex hulls. Tests check our code against these, never against itself."""
import math

import numpy as np


def rot(axis, t):
    k = np.eye(3)[axis]
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(t) * Kx + (1 - math.cos(t)) * Kx @ Kx


def R_zxy(a, b, c):
    return rot(2, a) @ rot(0, b) @ rot(1, c)


def corners(box):
    u = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float) - 0.5
    return np.asarray(box[:3]) + (u * box[3:6]) @ R_zxy(*box[6:9]).T


def hull(points):
    """Convex hull (counter-clockwise in image coordinates with y down: we just need
    consistency) by the monotone chain."""
    pts = sorted(map(tuple, points))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lo, up = [], []
    for p in pts:
        while len(lo) >= 2 and cross(lo[-2], lo[-1], p) <= 0:
            lo.pop()
        lo.append(p)
    for p in reversed(pts):
        while len(up) >= 2 and cross(up[-2], up[-1], p) <= 0:
            up.pop()
        up.append(p)
    return np.array(lo[:-1] + up[:-1])


def signed_dist_inside(poly, p):
    """Distance of points p [N,2] to the hull boundary, positive inside."""
    e = np.roll(poly, -1, 0) - poly
    n = np.stack([-e[:, 1], e[:, 0]], 1) / np.linalg.norm(e, axis=1, keepdims=True)
    return ((p[:, None, :] - poly[None]) * n[None]).sum(-1).min(1)


def scene_of(s):
    """The scene as scenes.render wants it, with camera -> aligned-world poses E_k."""
    return {"objects": s.meta["objects"], "room": s.meta["room"],
            "c2w": s.axis_align @ s.cam2global}


def same_box(a, b, tol=1e-6):
    """The same solid: the same 8 corners as a set (a box has several spellings: turns by 90 degrees
    about an axis with sizes swapped, half turns, ...)."""
    ca, cb = corners(a), corners(b)
    d = np.linalg.norm(ca[:, None] - cb[None], axis=-1)  # [8, 8]
    return bool(d.min(1).max() <= tol and d.min(0).max() <= tol)

