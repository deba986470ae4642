"""boxes.py: 9-DoF boxes: the rotation convention, corners, moving a box between frames, and the
exact 3D IoU.

Substrate shared by rewards.py (the IoU reward and matching), data.py (readers, drawing), scenes.py
(the synthetic world) and the published protocol (published.py). It imports nothing of rft3d.

A box is 9 floats [cx, cy, cz, dx, dy, dz, a, b, c]: the centre in metres, the full extents along
the object's own x, y, z axes, and intrinsic Z-X-Y Euler angles, R = Rz(a) @ Rx(b) @ Ry(c), as
EmbodiedScan / VG-LLM (pytorch3d's "ZXY"); corners = centre + R @ (size * (u - 0.5)) for the 8
unit-cube corners u (DESIGN.md section 3).
"""
import math

import numpy as np


# --------------------------------------------------------------------------------------------------
# 1. Numbers and boxes from untrusted JSON


def number(x):
    """A finite float from a JSON number, else None (bools are ints in Python: reject them)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    try:
        v = float(x)
    except OverflowError:  # a 400-digit JSON integer
        return None
    return v if math.isfinite(v) else None


def box9(b):
    """A list of 9 finite floats, else None."""
    if not isinstance(b, (list, tuple, np.ndarray)) or len(b) != 9:
        return None
    vals = [number(x) for x in (b.tolist() if isinstance(b, np.ndarray) else b)]
    return None if any(v is None for v in vals) else vals


# --------------------------------------------------------------------------------------------------
# 2. Rotations, corners, frames. Intrinsic Z-X-Y Euler angles, as EmbodiedScan/VG-LLM (pytorch3d
#    "ZXY"): R = Rz(a) Rx(b) Ry(c).

# the unit-cube corners (corner i = 4x + 2y + z) and its 6 faces as cycles of corner indices
_UNIT = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=float)
_FACES = ((0, 1, 3, 2), (4, 5, 7, 6), (0, 4, 5, 1), (2, 6, 7, 3), (0, 2, 6, 4), (1, 3, 7, 5))


def euler_to_matrix(a, b, c):
    ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
    cc, sc = math.cos(c), math.sin(c)
    rz = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cb, -sb], [0.0, sb, cb]])
    ry = np.array([[cc, 0.0, sc], [0.0, 1.0, 0.0], [-sc, 0.0, cc]])
    return rz @ rx @ ry


def matrix_to_euler(R):
    """(a, b, c) with euler_to_matrix(a, b, c) == R. Row 2 of Rz Rx Ry is [-cb sc, sb, cb cc] and
    column 1 is [-sa cb, ca cb, sb]; at gimbal lock (cb = 0) only a +- c is defined: take c = 0."""
    cb = math.hypot(R[2, 0], R[2, 2])
    b = math.atan2(R[2, 1], cb)
    if cb > 1e-9:
        return math.atan2(-R[0, 1], R[1, 1]), b, math.atan2(-R[2, 0], R[2, 2])
    return math.atan2(R[1, 0], R[0, 0]), b, 0.0


def box_corners(box):
    """[8, 3] corners: centre + R @ (size * (u - 0.5)) for the unit-cube corners u (row i is
    corner 4x + 2y + z)."""
    b = np.asarray(box, dtype=float)
    return b[:3] + ((_UNIT - 0.5) * b[3:6]) @ euler_to_matrix(*b[6:9]).T


def box_to_world(box, E):
    """Move a box by the 4x4 rigid transform E (e.g. E_k = axis_align @ cam2global[k]): centre
    E @ [c, 1], rotation E[:3,:3] @ R, sizes unchanged (so E must be rigid; ScanNet's are)."""
    b, E = np.asarray(box, dtype=float), np.asarray(E, dtype=float)
    with np.errstate(all="ignore"):
        centre = E[:3, :3] @ b[:3] + E[:3, 3]
        R = E[:3, :3] @ euler_to_matrix(*b[6:9])
    return [float(v) for v in (*centre, *b[3:6], *matrix_to_euler(R))]


def box_from_world(box, E):
    """Inverse of box_to_world: a world box into the frame whose camera-to-world transform is E."""
    return box_to_world(box, np.linalg.inv(np.asarray(E, dtype=float)))


# --------------------------------------------------------------------------------------------------
# 3. Exact 3D IoU. Work in B's own frame, where B is the axis-aligned box [-h, h]. A (a convex
#    polyhedron, a list of planar faces) is clipped by B's 6 planes one at a time
#    (Sutherland-Hodgman on every face, then the cut is closed by a new face). The volume of the
#    convex result is the sum of the pyramids from an interior point to each face. Pitch and roll
#    are exact: no bird's-eye-view shortcut.


def prepare(box):
    """Box -> (centre, R, half sizes, volume, radius, corners), or None if degenerate or
    non-finite."""
    b = box9(box)
    if b is None or min(b[3:6]) <= 0:
        return None
    vol, radius = b[3] * b[4] * b[5], 0.5 * math.hypot(*b[3:6])
    R, b = euler_to_matrix(*b[6:9]), np.array(b)
    with np.errstate(all="ignore"):
        corners = b[:3] + ((_UNIT - 0.5) * b[3:6]) @ R.T  # [8, 3]
    if not (math.isfinite(vol) and vol > 0 and math.isfinite(radius)
            and np.isfinite(corners).all()):
        return None  # e.g. 1e200-metre boxes, whose volume overflows
    return b[:3], R, b[3:6] / 2, vol, radius, corners


def _clip(verts, faces, k, s, h, eps):
    """Keep the part of the polyhedron (vertex list, faces as index cycles) with s * x[k] <= h.
    Sutherland-Hodgman on every face; each crossing edge gets one new vertex, shared by its two
    faces. The new vertices bound the cut, which becomes a new face. (A vertex lying on the plane
    needs no special case: its edges to the cut-off side cross the plane right next to it.)"""
    d = [s * v[k] - h for v in verts]
    inside = [x <= eps for x in d]
    out, made = [], {}
    for face in faces:
        if max(d[v] for v in face) < -eps:  # strictly inside: unchanged
            out.append(face)
            continue
        kept = []
        for p, q in zip(face, face[1:] + face[:1]):
            if inside[p]:
                kept.append(p)
            if inside[p] != inside[q]:  # the edge crosses the plane
                e = (p, q) if p < q else (q, p)
                if e not in made:
                    u, w, t = verts[e[0]], verts[e[1]], d[e[0]] / (d[e[0]] - d[e[1]])
                    made[e] = len(verts)
                    verts.append([u[0] + t * (w[0] - u[0]), u[1] + t * (w[1] - u[1]),
                                  u[2] + t * (w[2] - u[2])])
                kept.append(made[e])
        if len(kept) >= 3:
            out.append(kept)
    if len(made) >= 3:  # close the cut: its vertices in angular order around their mean
        cut, (i, j) = list(made.values()), [m for m in range(3) if m != k]
        mi, mj = sum(verts[v][i] for v in cut) / len(cut), sum(verts[v][j] for v in cut) / len(cut)
        out.append(sorted(cut, key=lambda v: math.atan2(verts[v][j] - mj, verts[v][i] - mi)))
    return out


def _volume(verts, faces):
    """Volume of a convex polyhedron: sum over faces of |N . (v0 - o)| / 6, N the Newell normal
    (length twice the face area), o an interior point (the vertex mean), so every pyramid counts
    positive."""
    used = {v for f in faces for v in f}
    if not used:
        return 0.0
    o = [sum(verts[v][m] for v in used) / len(used) for m in range(3)]
    vol = 0.0
    for f in faces:
        v0 = verts[f[0]]
        nx = ny = nz = 0.0
        for a, b in zip(f[1:], f[2:]):  # fan triangulation from v0: N = sum of (p - v0) x (q - v0)
            p, q = verts[a], verts[b]
            ux, uy, uz = p[0] - v0[0], p[1] - v0[1], p[2] - v0[2]
            wx, wy, wz = q[0] - v0[0], q[1] - v0[1], q[2] - v0[2]
            nx, ny, nz = nx + uy * wz - uz * wy, ny + uz * wx - ux * wz, nz + ux * wy - uy * wx
        vol += abs(nx * (v0[0] - o[0]) + ny * (v0[1] - o[1]) + nz * (v0[2] - o[2])) / 6.0
    return vol


def _intersection(A, B):
    (ca, Ra, ha, va, ra, corners_a), (cb, Rb, hb, vb, rb, corners_b) = A, B
    # 1. cheap rejections: bounding spheres apart, or a face axis of A or B separates the boxes
    if math.dist(ca, cb) >= ra + rb:
        return 0.0
    a_in_b = (corners_a - cb) @ Rb  # [8, 3] A's corners in B's frame
    b_in_a = (corners_b - ca) @ Ra
    if (a_in_b.min(0) >= hb).any() or (a_in_b.max(0) <= -hb).any():
        return 0.0
    if (b_in_a.min(0) >= ha).any() or (b_in_a.max(0) <= -ha).any():
        return 0.0
    # 2. containment: the smaller box's volume, exactly
    eps = 1e-10 * (ra + rb)
    if (np.abs(a_in_b) <= hb + eps).all():
        return va
    if (np.abs(b_in_a) <= ha + eps).all():
        return vb
    # 3. the exact clip, in plain Python floats (faster than numpy for a dozen small polygons)
    verts, faces = a_in_b.tolist(), [list(f) for f in _FACES]
    for k in range(3):
        for s in (1.0, -1.0):
            faces = _clip(verts, faces, k, s, float(hb[k]), eps)
            if not faces:
                return 0.0
    return _volume(verts, faces)


def iou_prepared(A, B):
    """IoU of two prepared boxes (prepare(); None for a degenerate one): matching prepares each box
    once."""
    if A is None or B is None:
        return 0.0
    inter = _intersection(A, B)
    union = A[3] + B[3] - inter
    iou = inter / union if union > 0 else 0.0
    return min(max(iou, 0.0), 1.0) if math.isfinite(iou) else 0.0


def iou_3d(a, b):
    """Exact IoU of two 9-DoF boxes in [0, 1]; 0.0 for degenerate, non-finite or malformed boxes."""
    return iou_prepared(prepare(a), prepare(b))


def iou_3d_many(a, boxes):
    """IoU of one box with each of `boxes` -> [N] array (box a prepared once)."""
    A = prepare(a)
    return np.array([iou_prepared(A, prepare(b)) for b in boxes], dtype=float)
