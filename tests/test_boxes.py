"""boxes.py: corners, Euler angles and exact 3D IoU against independent geometry."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import boxes
import boxes as B
from independent import R_zxy


PI = math.pi
# area of a unit square intersected with itself turned 45 deg (regular octagon)
OCT = 2 * (math.sqrt(2) - 1)


# ---- independent geometry: rotations by Rodrigues' formula, point-in-box tests -------------------

def rodrigues(axis, angle):
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def rot_zxy(a, b, c):  # intrinsic Z-X-Y: first about z, then the new x, then the new y
    return rodrigues([0, 0, 1], a) @ rodrigues([1, 0, 0], b) @ rodrigues([0, 1, 0], c)


def corners_ref(box):
    c, s = np.asarray(box[:3], float), np.asarray(box[3:6], float)
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    return c + (signs * s / 2) @ rot_zxy(*box[6:9]).T


def inside(points, box):
    local = (points - np.asarray(box[:3])) @ rot_zxy(*box[6:9])  # R^T (p - c) for row vectors
    return (np.abs(local) <= np.asarray(box[3:6]) / 2).all(axis=1)


def random_rigid(rng):
    E = np.eye(4)
    E[:3, :3] = rodrigues(rng.normal(size=3), rng.uniform(-PI, PI))
    E[:3, 3] = rng.uniform(-3, 3, 3)
    return E


def random_box(rng, spread=0.6):
    return [*rng.uniform(-spread, spread, 3), *rng.uniform(0.4, 2.0, 3), *rng.uniform(-PI, PI, 3)]


def same_point_set(P, Q, tol=1e-9):
    d = np.linalg.norm(P[:, None] - Q[None], axis=-1)
    return d.min(1).max() < tol and d.min(0).max() < tol


# ---- boxes and conventions -----------------------------------------------------------------------

def test_corners_follow_intrinsic_zxy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        box = random_box(rng)
        assert same_point_set(B.box_corners(box), corners_ref(box))
    # the order of the rotations matters for these angles, so the check
    # above can tell conventions apart
    assert not np.allclose(rot_zxy(0.3, 0.5, 0.7),
                           rodrigues([0, 1, 0], 0.7) @ rodrigues([1, 0, 0], 0.5)
                           @ rodrigues([0, 0, 1], 0.3))
    # yaw 90 deg turns the box's x extent onto world y
    c = B.box_corners([0, 0, 0, 2, 1, 1, PI / 2, 0, 0])
    assert np.allclose(np.abs(c).max(0), [0.5, 1.0, 0.5])


def test_euler_round_trip_including_gimbal_lock():
    rng = np.random.default_rng(1)
    angles = ([rng.uniform(-PI, PI, 3) for _ in range(50)]
              + [(0.4, PI / 2, 0.3), (-1.0, -PI / 2, 2.0)])
    for a, b, c in angles:
        M = rot_zxy(a, b, c)
        assert np.allclose(rot_zxy(*B.matrix_to_euler(M)), M, atol=1e-9)


def test_box_to_world_moves_corners_rigidly():
    rng = np.random.default_rng(2)
    for _ in range(20):
        box, E = random_box(rng), random_rigid(rng)
        moved = B.box_to_world(box, E)
        expect = corners_ref(box) @ E[:3, :3].T + E[:3, 3]
        assert same_point_set(corners_ref(moved), expect)
        assert np.allclose(B.box_from_world(moved, E)[:6], box[:6])


# ---- Euler angles --------------------------------------------------------------------------------
def test_euler_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, c = rng.uniform(-math.pi, math.pi, 2)
        b = rng.uniform(-math.pi / 2 + 1e-3, math.pi / 2 - 1e-3)
        assert np.allclose(boxes.euler_to_matrix(a, b, c), R_zxy(a, b, c), atol=1e-12)
        assert np.allclose(boxes.matrix_to_euler(R_zxy(a, b, c)), (a, b, c), atol=1e-9)
    for b in (math.pi / 2, -math.pi / 2):   # gimbal lock: angles differ, the rotation must not
        R = R_zxy(0.3, b, -1.1)
        assert np.allclose(R_zxy(*boxes.matrix_to_euler(R)), R, atol=1e-9)


# ---- exact IoU against hand-computed values ------------------------------------------------------

@pytest.mark.parametrize("a, b, expected", [
    # unit-ish cubes shifted along x: intersection 1 x 2 x 2 = 4, union 8 + 8 - 4
    ([0, 0, 0, 2, 2, 2, 0, 0, 0], [1, 0, 0, 2, 2, 2, 0, 0, 0], 4 / 12),
    # overlap in all three axes: [0,2]^3 vs x[1,2] y[.5,2.5] z[0,3]:
    # 1 * 1.5 * 2 = 3, union 8 + 6 - 3
    ([1, 1, 1, 2, 2, 2, 0, 0, 0], [1.5, 1.5, 1.5, 1, 2, 3, 0, 0, 0], 3 / 11),
    # touching faces / disjoint
    ([0, 0, 0, 1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 1, 0, 0, 0], 0.0),
    ([0, 0, 0, 1, 1, 1, 0, 0, 0], [5, 5, 5, 1, 1, 1, 0.3, 0.2, 0.1], 0.0),
    # the same box
    ([0.3, -1, 2, 1, 2, 3, 0.4, 0.5, 0.6], [0.3, -1, 2, 1, 2, 3, 0.4, 0.5, 0.6], 1.0),
    # two unit cubes, one turned 45 deg about each of its axes: an octagonal prism of height 1
    ([0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, PI / 4, 0, 0], OCT / (2 - OCT)),
    ([0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, PI / 4, 0], OCT / (2 - OCT)),
    ([0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, PI / 4], OCT / (2 - OCT)),
    # ... and shifted by half along the shared axis: half the prism
    ([0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0.5, 1, 1, 1, PI / 4, 0, 0], (OCT / 2) / (2 - OCT / 2)),
    # a tilted box well inside a big cube: volume ratio 6 / 1000
    ([0, 0, 0, 10, 10, 10, 0, 0, 0], [0.5, -0.5, 1, 1, 2, 3, 0.7, -0.4, 1.1], 6 / 1000),
    # 90 deg turns are the same box with permuted sizes
    ([0, 0, 0, 1, 2, 3, PI / 2, 0, 0], [0, 0, 0, 2, 1, 3, 0, 0, 0], 1.0),
    ([0, 0, 0, 1, 2, 3, 0, PI / 2, 0], [0, 0, 0, 1, 3, 2, 0, 0, 0], 1.0),
    ([0, 0, 0, 1, 2, 3, 0, 0, PI / 2], [0, 0, 0, 3, 2, 1, 0, 0, 0], 1.0),
    ([0, 0, 0, 1, 2, 3, PI, 0, 0], [0, 0, 0, 1, 2, 3, 0, 0, 0], 1.0),
    # a vertex exactly on a clipping plane while its neighbours are cut off (cos, sin = 0.6, 0.8):
    # the footprint (3.5,.5) (-.5,3.5) (-3.5,-.5) (.5,-3.5) cut at y = 0.5 keeps area
    # 25 - 6.25 * 3 / 2
    ([0, 0, 0, 5, 5, 1, math.atan2(4, 3), 0, 0], [0, -4.75, 0, 20, 10.5, 1, 0, 0, 0],
     15.625 / (235 - 15.625)),
    # turned 90 deg about z, then shifted: [-1,1]x[-.5,.5]x[-1.5,1.5]
    # vs the same shifted by 0.5 in x
    ([0, 0, 0, 1, 2, 3, PI / 2, 0, 0], [0.5, 0, 0, 2, 1, 3, 0, 0, 0], 4.5 / (12 - 4.5)),
])
def test_iou_analytic(a, b, expected):
    assert B.iou_3d(a, b) == pytest.approx(expected, abs=1e-9)
    assert B.iou_3d(b, a) == pytest.approx(expected, abs=1e-9)


def test_iou_monte_carlo_tilted_pairs():
    """Intersection volumes of random 9-DoF pairs vs a Monte Carlo
    estimate (4 sigma from the count)."""
    rng = np.random.default_rng(123)
    n, checked = 200_000, 0
    while checked < 12:
        a, b = random_box(rng), random_box(rng)
        if B.iou_3d(a, b) < 0.05:  # keep pairs that really overlap, so the test has teeth
            continue
        checked += 1
        va, vb = np.prod(a[3:6]), np.prod(b[3:6])
        iou = B.iou_3d(a, b)
        inter = iou * (va + vb) / (1 + iou)  # from IoU = I / (va + vb - I)
        pts = np.vstack([corners_ref(a), corners_ref(b)])
        lo, hi = pts.min(0), pts.max(0)
        sample = rng.uniform(lo, hi, size=(n, 3))
        p = (inside(sample, a) & inside(sample, b)).mean()
        vol = np.prod(hi - lo)
        sigma = vol * math.sqrt(max(p * (1 - p), 1 / n) / n)
        assert abs(inter - vol * p) <= 4 * sigma, (a, b, inter, vol * p, sigma)


def test_iou_properties_random():
    rng = np.random.default_rng(7)
    for _ in range(100):
        a, b, E = random_box(rng), random_box(rng), random_rigid(rng)
        v = B.iou_3d(a, b)
        assert 0.0 <= v <= 1.0
        assert B.iou_3d(b, a) == pytest.approx(v, abs=1e-9)
        assert B.iou_3d(a, a) == pytest.approx(1.0, abs=1e-9)
        assert B.iou_3d(B.box_to_world(a, E), B.box_to_world(b, E)) == pytest.approx(v, abs=1e-9)
        # a yaw-only box: (dx, dy, yaw) and (dy, dx, yaw + pi/2) are the same box
        y = [*a[:6], a[6], 0.0, 0.0]
        y2 = [*a[:3], a[4], a[3], a[5], a[6] + PI / 2, 0.0, 0.0]
        assert B.iou_3d(y2, b) == pytest.approx(B.iou_3d(y, b), abs=1e-9)
        assert B.iou_3d(y, y2) == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(B.iou_3d_many(a, [a, b]), [1.0, B.iou_3d(a, b)])


grid = st.integers(-8, 8).map(lambda i: i / 4)


right_angles = st.integers(-2, 2).map(lambda i: i * PI / 2)


aligned_box = st.tuples(grid, grid, grid, *[st.integers(1, 12).map(lambda i: i / 4)] * 3,
                        right_angles, right_angles, right_angles).map(list)


def aabb_iou(a, b):
    """IoU of two boxes that are axis-aligned in effect (right-angle
    rotations), from their corner extents."""
    (alo, ahi), (blo, bhi) = [(corners_ref(x).min(0), corners_ref(x).max(0)) for x in (a, b)]
    inter = np.prod(np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None))
    return inter / (np.prod(ahi - alo) + np.prod(bhi - blo) - inter)


@settings(max_examples=400, deadline=None)
@given(aligned_box, aligned_box)
def test_iou_right_angle_boxes_on_a_grid(a, b):
    """Shared and touching faces everywhere: the tolerance logic of the clip
    against interval arithmetic."""
    assert B.iou_3d(a, b) == pytest.approx(aabb_iou(a, b), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=3, max_size=3),
       st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
       st.lists(st.floats(-7, 7), min_size=3, max_size=3), aligned_box)
def test_iou_bounds_and_symmetry_extreme_shapes(c, size, angles, other):
    a = [*c, *size, *angles]
    v = B.iou_3d(a, other)
    assert 0.0 <= v <= 1.0 and B.iou_3d(other, a) == pytest.approx(v, abs=1e-7)
    assert B.iou_3d(a, a) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("bad", [
    [0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, -1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, float("nan"), 0, 0], [float("inf"), 0, 0, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 0, 0], [0] * 10, "box", None, [None] * 9, ["0"] * 9, [True] * 9,
    {"bbox_3d": [0] * 9}, [0, 0, 0, 1e300, 1e300, 1e300, 0, 0, 0],
])
def test_iou_degenerate_is_zero(bad):
    for good in ([0, 0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]):
        assert B.iou_3d(bad, good) == 0.0 and B.iou_3d(good, bad) == 0.0
