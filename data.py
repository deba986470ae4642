"""data.py: what a training example is, and readers for the real data files.

A Sample is frames (uint8 [S,H,W,3]) + camera poses + exact ground truth for one of three tasks:
  detection   9-DoF boxes [cx,cy,cz,dx,dy,dz,a,b,c] with labels, in the FIRST frame's camera
              coordinates
  grounding   a referring expression -> target frame k + box in camera k (and the box in the
              aligned world); rows without a target frame (ScanRefer val) have target_frame None
              and only the world box
  spatial     a VSI-Bench-style question with options (multiple choice) or a numeric answer
Conventions (DESIGN.md section 3): R = Rz(a) @ Rx(b) @ Ry(c); OpenCV cameras (x right, y down,
z forward); cam2global[k] is camera k -> raw world and E_k = axis_align @ cam2global[k] is
camera k -> aligned world.

Sections: 1. Sample (task names, DataError, collate) and the data order (StepSampler: which
   samples each rank reads at optimiser step k, a pure function of k, so resume is exact)
2. real readers (VG-LLM JSON, VSI-Bench, ScanNet posed folders): checked when opened (file, task,
   every row, media headers), with a report of what was read (SHA-256, counts, skips):
   load_dataset, load_files (several files, parse_files for PATH:WEIGHT), describe (the report)
3. export to VG-LLM's layout, drawing boxes.
The synthetic world that makes Samples without any files is scenes.py, built on this file. This
module imports nothing of ours but boxes.py (box geometry); the command line that shows and
exports synthetic scenes is scenes.py's.
"""
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from boxes import box_corners, box_to_world  # 9-DoF box geometry (boxes.py)

# --------------------------------------------------------------------------------------------------
# 1. Sample and the data order
# --------------------------------------------------------------------------------------------------
TASK_NAMES = ("detection", "grounding", "spatial")


class DataError(ValueError):
    """A bad input file or row: the message names the file (and row). train.py and eval.py print it
    as one line and exit 1, like a bad flag (exit 2), without a traceback."""


@dataclass
class Sample:
    id: str
    task: str
    frames: np.ndarray                       # uint8 [S,H,W,3]
    intrinsics: np.ndarray | None = None     # [3,3] pinhole K (None when unknown)
    cam2global: np.ndarray | None = None     # [S,4,4] camera -> raw world (None when unknown)
    axis_align: np.ndarray = field(default_factory=lambda: np.eye(4))  # [4,4] raw -> aligned world
    boxes: list = field(default_factory=list)  # detection: [{"label", "bbox_3d"}] in camera 0
    description: str = ""                    # grounding: referring expression
    target_frame: int | None = None          # grounding: frame index; None: the row has none
    #                                          (ScanRefer val), so no frame reward, no SFT target,
    #                                          not in frame accuracy
    target_box: list = field(default_factory=list)  # grounding: 9 floats in camera target_frame;
    #                                                 [] when there is none
    world_box: list = field(default_factory=list)   # grounding: 9 floats in the aligned world
    question: str = ""                       # spatial: the question (no pre/post prompt)
    options: list = field(default_factory=list)  # spatial: ["A. left", "B. right"]; [] for numbers
    ground_truth: str = ""                   # spatial: option letter or number as a string
    question_type: str = ""                  # spatial: VSI-Bench question type
    meta: dict = field(default_factory=dict)  # free: scene objects, room, unique flag, ...


# VSI-Bench's question types (route_planning, which the readers also accept, scenes.py never makes)
SPATIAL_TYPES = ("object_counting", "object_abs_distance", "object_size_estimation",
                 "room_size_estimation", "object_rel_distance", "object_rel_direction_easy",
                 "object_rel_direction_medium", "object_rel_direction_hard",
                 "obj_appearance_order")


def collate(batch):
    """Samples stay a list: frames differ in size across sources; model.py does the pixel work."""
    return list(batch)


class StepSampler:
    """Batch sampler: for optimiser step k, this rank's sample indices. Epochs are permutations
    seeded by (seed, epoch); the global batch is cut into per-rank slices, so each rank owns whole
    prompts (and in GRPO all G completions of them). A pure function of k: resuming at step k gives
    the same data.

    mix = [(rows, weight)] per file of a --data mix (rows concatenated in that order): the stream is
    cut into blocks of W = sum(weights) positions, each holding `weight` rows of each file in an
    order shuffled by (seed, block), so every block has the proportions exactly; file f's rows come
    from its own stream of epochs, permuted by (seed, f + 1, epoch). Still a pure function of k."""

    def __init__(self, n, per_rank, rank, world, seed, start_step, shuffle=True, mix=None):
        self.n, self.per_rank, self.rank, self.world = n, per_rank, rank, world
        self.seed, self.step, self.shuffle, self.mix = seed, start_step, shuffle, mix

    def _stream(self, pos, n, key):
        """Row at position pos of endless epochs over n rows, each permuted by key + (epoch,)."""
        epoch, i = divmod(pos, n)
        return int(np.random.default_rng((*key, epoch)).permutation(n)[i]) if self.shuffle else i

    def index(self, pos):
        if self.mix is None:
            return self._stream(pos, self.n, (self.seed,))
        weights = [w for _, w in self.mix]
        block, j = divmod(pos, sum(weights))  # 1. which block, which slot of it
        files = np.repeat(np.arange(len(weights)), weights)
        slots = np.random.default_rng((self.seed, block)).permutation(files)
        f = int(slots[j])  # 2. the slot's file, and how many of its rows came before
        k = block * weights[f] + int((slots[:j] == f).sum())
        offset = sum(rows for rows, _ in self.mix[:f])
        return offset + self._stream(k, self.mix[f][0], (self.seed, f + 1))  # 3. its k-th row

    def indices(self, step):
        first = (step * self.world + self.rank) * self.per_rank  # position in the endless stream
        return [self.index(pos) for pos in range(first, first + self.per_rank)]

    def __iter__(self):
        while True:
            yield self.indices(self.step)
            self.step += 1


# --------------------------------------------------------------------------------------------------
# 2. Real data: VG-LLM JSON (ScanNet detection, ScanRefer), VSI-Bench, ScanNet posed-image folders
#    Opening a file checks everything that can be checked without decoding pixels, so a bad file
#    fails in seconds with its name and row, not hours into a run; RowDataset.report says exactly
#    what was read.
# --------------------------------------------------------------------------------------------------
# VSI-Bench's numeric-answer types (scored by MRA); the others are multiple choice (option letter).
NUMERIC_TYPES = ("object_counting", "object_abs_distance", "object_size_estimation",
                 "room_size_estimation")


def frame_indices(N, n):
    """n of a video's N frames, uniformly: np.linspace(0, N - 1, n).astype(int), i.e. *floored*, as
    VG-LLM samples (src/lmms_eval/models/vgllm.py; its training loader
    src/qwen_vl/data/data_qwen.py uses linspace(..., dtype=int), the same floor). Rounding would
    pick other frames (15 of 32 for 100 frames). All N frames when n is None or n >= N."""
    return np.arange(N) if n is None or n >= N else np.linspace(0, N - 1, n).astype(int)


def read_image(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_size(path):
    """(width, height) from the file's header; PIL decodes no pixels here, so checking a whole
    dataset is fast."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        # missing, unreadable, or not an image (UnidentifiedImageError)
        raise ValueError(f"cannot read image {path}: {e}") from e


def _stack(images, where):
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{where}: frames differ in size: {sorted({im.shape for im in images})}")
    return np.stack(images)


def _import_av(path):
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyAV: pip install av "
                          "(or give a folder of frames)") from e
    return av


def check_video(path):
    """The video opens and has a video stream (container header only, no frame decoded)."""
    av = _import_av(path)
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
    except Exception as e:
        # PyAV's errors (InvalidDataError, FileNotFoundError, ...) share no base but Exception
        raise ValueError(f"cannot open video {path}: {e}") from e


def read_video(path, n):
    """n uniformly sampled frames of a video through PyAV (optional dependency)."""
    av = _import_av(path)
    with av.open(path) as c:
        N = c.streams.video[0].frames or sum(1 for _ in c.decode(video=0))
    want, out = set(frame_indices(N, n).tolist()), {}
    with av.open(path) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i in want:
                out[i] = fr.to_ndarray(format="rgb24")
    return np.stack([out[i] for i in frame_indices(N, n) if i in out])


def _has_bool(x):
    """JSON true/false are Python bools, which are ints: unchecked, `true` would read as 1."""
    return isinstance(x, (bool, np.bool_)) or \
        (isinstance(x, (list, tuple)) and any(map(_has_bool, x)))


def _matrix(x, shape, what):
    if _has_bool(x):
        raise ValueError(f"{what} holds true/false where numbers belong")
    m = np.asarray(x, dtype=np.float64)
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise ValueError(f"{what} must be a finite array of shape {shape}, got {np.shape(x)}")
    return m


def frame_names(folder):
    """The frame files of a ScanNet posed folder ({frame}.jpg; {frame}.png only when there are no
    jpgs, because ScanNet keeps depth maps as {frame}.png beside the colour jpgs), in frame
    order."""
    names = [f for f in os.listdir(folder) if re.fullmatch(r"\d+\.(jpg|jpeg|png)", f.lower())]
    if any(not f.lower().endswith(".png") for f in names):
        names = [f for f in names if not f.lower().endswith(".png")]
    return sorted(names, key=lambda f: int(f.split(".")[0]))


def read_posed_folder(folder, n=None):
    """ScanNet posed images: {frame:05d}.jpg (or .png) + {frame:05d}.txt (4x4 camera-to-world),
    optional intrinsic.txt. Frames whose pose has inf/nan (ScanNet has some) are skipped before
    sampling. Returns (frames [n,H,W,3], cam2global [n,4,4] or None, intrinsics [3,3] or None,
    file names)."""
    names = frame_names(folder)
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
    for kname in ("intrinsic.txt", "intrinsic_color.txt",
                  os.path.join("intrinsic", "intrinsic_color.txt")):
        if os.path.exists(os.path.join(folder, kname)):
            K = np.loadtxt(os.path.join(folder, kname))[:3, :3]
            break
    return frames, (np.stack([poses[f] for f in names]) if has_pose else None), K, names


def read_rows(path):
    """-> (rows, SHA-256 of the file's bytes) of a JSON list, JSONL or parquet (pyarrow, imported
    lazily) file. The bytes are read once, so the hash is of exactly what was parsed. File-level
    problems (missing, empty, truncated, not JSON, not a list) raise a ValueError naming the file;
    a JSONL line that is not JSON becomes a ValueError in its row's place (reported with its row
    number)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow "
                              "(or use the JSON/JSONL)") from e
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from e
    sha = hashlib.sha256(raw).hexdigest()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty (an interrupted download or copy?)")
    if path.endswith(".parquet"):
        try:
            return pq.read_table(pa.BufferReader(raw)).to_pylist(), sha
        except Exception as e:   # pyarrow.ArrowInvalid and friends
            raise DataError(f"{path}: not a readable parquet file ({e}); truncated? "
                            "re-download it") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); is it really a JSON file?") from e
    if path.endswith(".jsonl"):
        rows = []
        for line in filter(str.strip, text.splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(ValueError(f"not JSON: {e}"))
        return rows, sha
    try:
        rows = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); a truncated file fails like this: "
                        "re-download or re-export it") from e
    if not isinstance(rows, list):
        what = f"an object with keys {sorted(rows)[:5]}" if isinstance(rows, dict) else \
            type(rows).__name__
        raise DataError(f"{path}: expected a JSON list of rows, got {what}")
    return rows, sha


# The fields that give a file's task away (the first one a row has decides).
TELLTALE = (("boxes", "detection"), ("gt_bbox", "grounding"), ("target", "grounding"),
            ("question_type", "spatial"))


def file_kind(rows):
    """(task, field) the file's rows look like, by majority over the rows; (None, None) if none."""
    votes = {}
    for row in rows:
        if isinstance(row, dict):
            hit = next(((task, k) for k, task in TELLTALE if k in row), None)
            if hit:
                votes[hit] = votes.get(hit, 0) + 1
    return max(votes, key=votes.get) if votes else (None, None)


def _box9(x, what):
    if not (isinstance(x, (list, tuple)) and len(x) == 9 and not _has_bool(x)
            and all(isinstance(v, (int, float)) for v in x) and all(math.isfinite(v) for v in x)):
        raise ValueError(f"{what} must be 9 finite numbers, got {x!r}")
    if min(x[3:6]) <= 0:
        raise ValueError(f"{what} must have positive sizes (elements 3-5), got {x!r}")
    return [float(v) for v in x]


def _spec_vgllm(task, row, media_root, frames):
    """Check one VG-LLM row and turn it into a spec (paths checked, media not read yet)."""
    if not isinstance(row, dict):
        raise ValueError(f"row is not an object: {row!r:.80}")
    images = row["images"]
    if not (isinstance(images, list) and images and all(isinstance(p, str) for p in images)):
        raise ValueError("'images' must be a non-empty list of paths")
    if not isinstance(row.get("metadata") or {}, dict):
        raise ValueError(f"'metadata' must be an object, got {row['metadata']!r:.60}")
    paths = [os.path.join(media_root, p) for p in images]
    S = len(paths)
    keep = frame_indices(S, frames)
    spec = {"task": task, "paths": [paths[i] for i in keep],
            "meta": dict(row.get("metadata") or {})}
    # the scene, for eval.py --proposals: the metadata's, else the images' folder
    # (scannet/posed_images/<scene>/)
    spec["meta"].setdefault("scene_id", os.path.basename(os.path.dirname(images[0])))
    c2g = row.get("cam2global")
    spec["cam2global"] = _matrix(c2g, (S, 4, 4), "cam2global")[keep] if c2g is not None else None
    spec["axis_align"] = _matrix(row.get("axis_align_matrix", np.eye(4)), (4, 4),
                                 "axis_align_matrix")
    K = row.get("cam2img")   # 4x4 in VG-LLM's rows (3x3 accepted)
    spec["intrinsics"] = None if K is None else \
        _matrix(K, np.shape(K) if np.shape(K) == (3, 3) else (4, 4), "cam2img")[:3, :3]
    if task == "detection":
        _spec_detection(spec, row, keep)
    else:
        _spec_grounding(spec, row, keep, S)
    return spec


def _spec_detection(spec, row, keep):
    """A detection row's boxes into spec (in place)."""
    if not isinstance(row["boxes"], list):
        raise ValueError("'boxes' must be a list")
    spec["boxes"] = []
    for j, b in enumerate(row["boxes"]):
        if not isinstance(b, dict):
            raise ValueError(f"boxes[{j}] must be an object with 'label' and 'bbox_3d', "
                             f"got {b!r:.60}")
        if not isinstance(b.get("label"), str) or not b["label"].strip():
            raise ValueError(f"boxes[{j}].label must be a non-empty string, got {b.get('label')!r}")
        spec["boxes"].append({"label": b["label"],
                              "bbox_3d": _box9(b["bbox_3d"], f"boxes[{j}].bbox_3d")})
    if keep[0] != 0:
        raise ValueError("detection frames must keep the first frame")


def _spec_grounding(spec, row, keep, S):
    """A grounding row's description, world box and target (frame + box) into spec (in place)."""
    text = row.get("description") or row.get("prompt") or row["conversations"][0]["value"]
    m = re.search(r"Text: (.*)\n", text)
    spec["description"] = row.get("description") or (m.group(1) if m else None)
    if not spec["description"]:
        raise ValueError("no description ('Text: ...' line in the prompt)")
    spec["world_box"] = _box9(row["gt_bbox"], "gt_bbox")
    target = row.get("target")
    if target is not None:   # train rows: frame + box; val rows have no frame (target None)
        if not isinstance(target, dict):
            raise ValueError(f"'target' must be an object with 'frame' and 'bbox_3d', "
                             f"got {target!r:.60}")
        f = target.get("frame")
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < S:
            raise ValueError(f"target frame must be an int in [0, {S}), got {f!r}")
        k = int(np.argmin(np.abs(keep - f)))   # nearest kept frame when subsampling
        spec["target_frame"], spec["target_box"] = k, _box9(target["bbox_3d"], "target.bbox_3d")
        if keep[k] != f:   # the box must move to the kept frame's camera
            if spec["cam2global"] is None:
                raise ValueError("subsampling a grounding row needs 'cam2global'")
            E = spec["axis_align"] @ spec["cam2global"][k]
            spec["target_box"] = box_to_world(spec["world_box"], np.linalg.inv(E))
    elif spec["cam2global"] is None:
        raise ValueError("a grounding row needs a 'target' or 'cam2global' (to score boxes)")
    qt = spec["meta"].get("question_type")
    spec["meta"]["unique"] = None if qt not in ("unique", "multiple") else qt == "unique"


def _spec_vsi(row, media_root, frames):
    if not isinstance(row, dict):
        raise ValueError(f"row is not an object: {row!r:.80}")
    for k in ("dataset", "scene_name", "question_type", "question", "ground_truth"):
        v = row.get(k)
        if isinstance(v, bool):
            raise ValueError(f"{k!r} is {str(v).lower()}, not a string or number")
        if not isinstance(v, (str, int, float)) or v == "":
            raise ValueError(f"missing or empty field {k!r}")
    qt, gt, options = row["question_type"], str(row["ground_truth"]).strip(), row.get("options")
    if qt not in SPATIAL_TYPES + ("route_planning",):
        raise ValueError(f"unknown question_type {qt!r}")
    if isinstance(options, str):   # list("A. left") would be 7 one-letter options
        raise ValueError(f"'options' must be a list of strings, got one string {options!r:.60}")
    options = [] if options is None else options
    if not (isinstance(options, (list, tuple))
            and all(isinstance(o, str) and o.strip() for o in options)):
        raise ValueError(f"'options' must be a list of non-empty strings, got {options!r:.80}")
    if qt in NUMERIC_TYPES:
        if options:
            raise ValueError(f"a {qt} question is answered with a number, but the row has options")
        try:
            g = float(gt)
        except ValueError:
            raise ValueError(f"ground truth {gt!r} of a {qt} question is not a number") from None
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"ground truth {gt!r} must be a positive number (MRA divides by it)")
    else:
        letters = [o.split(".")[0].strip() for o in options]   # VSI-Bench options read "A. left"
        if gt.lower() not in [x.lower() for x in letters]:
            raise ValueError(f"ground truth {gt!r} is not one of the options' letters {letters}")
    video = os.path.join(media_root, str(row["dataset"]), f"{row['scene_name']}.mp4")
    folder = os.path.join(media_root, str(row["dataset"]), str(row["scene_name"]))
    if not os.path.exists(video) and not os.path.isdir(folder):
        raise ValueError(f"missing video {video} (or frame folder {folder})")
    if not isinstance(row.get("metadata") or {}, dict):
        raise ValueError(f"'metadata' must be an object, got {row['metadata']!r:.60}")
    return {"task": "spatial", "video": video if os.path.exists(video) else None, "folder": folder,
            "frames": 32 if frames is None else frames, "question": str(row["question"]),
            "options": list(options), "ground_truth": gt, "question_type": qt,
            "axis_align": _matrix(row.get("axis_align_matrix", np.eye(4)), (4, 4),
                                  "axis_align_matrix"),
            "meta": {"dataset": row["dataset"], "scene_name": row["scene_name"],
                     **(row.get("metadata") or {})}}


def _check_media(spec, seen):
    """A row's media, checked without decoding pixels: image headers readable and of one size, the
    video opens, the frame folder lists frames. `seen` caches per path (many rows share a scene's
    frames)."""
    def once(key, check):
        if key not in seen:
            try:
                seen[key] = check(key)
            except (OSError, ValueError) as e:
                seen[key] = e if isinstance(e, ValueError) else \
                    ValueError(f"cannot read {key}: {e}")
        if isinstance(seen[key], ValueError):
            raise seen[key]
        return seen[key]

    if spec["task"] != "spatial":
        sizes = [once(p, image_size) for p in spec["paths"]]
        for p, size in zip(spec["paths"], sizes):
            if size != sizes[0]:
                raise ValueError(f"frames differ in size: {spec['paths'][0]} is "
                                 f"{sizes[0][0]}x{sizes[0][1]}, {p} is {size[0]}x{size[1]}")
    elif spec["video"]:
        once(spec["video"], check_video)
    elif not once(spec["folder"], frame_names):
        raise ValueError(f"frame folder {spec['folder']} has no frames ({{frame}}.jpg or .png)")


class RowDataset(torch.utils.data.Dataset):
    """Checked rows of one real data file. Opening it (1) reads the file once and hashes its bytes,
    (2) checks that its rows have the shape of `task`, (3) checks every row: fields, values, and
    media without decoding (image headers, video containers, frame folders), (4) decodes the first
    row's media in full, so a systematic problem (a codec, a missing package) shows at once. Frames
    are decoded in __getitem__ (DataLoader workers welcome); a file damaged after opening still
    fails there with its file and row. .report says what was read: path, SHA-256, rows, kept, rows
    per question type, skipped rows with reasons."""

    def __init__(self, task, path, media_root=None, frames=None, skip_bad=False):
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}: one of {TASK_NAMES}")
        if media_root is None:   # our export's layout: the JSON next to a media/ folder
            media_root = os.path.join(os.path.dirname(path), "media")
            media_root = media_root if os.path.isdir(media_root) else os.path.dirname(path)
        rows, sha = read_rows(path)   # (1)
        kind, field = file_kind(rows)   # (2)
        if kind is not None and kind != task:
            raise DataError(f"{path}: this looks like a {kind} file (its rows have {field!r}), "
                            f"not {task}: check --task (or pass the {task} file)")
        self.path, self.specs, skipped, seen = path, [], [], {}
        for i, row in enumerate(rows):   # (3)
            try:
                if isinstance(row, Exception):
                    raise row
                spec = _spec_vsi(row, media_root, frames) if task == "spatial" else \
                    _spec_vgllm(task, row, media_root, frames)
                _check_media(spec, seen)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                reason = f"{type(e).__name__}: {e}"
                if not skip_bad:
                    raise DataError(f"{path}: row {i}: {reason}") from e
                skipped.append({"row": i, "reason": reason})
                continue
            spec["id"], spec["row"] = str(row.get("id", f"{os.path.basename(path)}:{i}")), i
            self.specs.append(spec)
        self.n_skipped = len(skipped)
        by_type = {}
        for sp in self.specs:
            t = str(sp.get("question_type") or sp["meta"].get("question_type") or task)
            by_type[t] = by_type.get(t, 0) + 1
        self.report = {"path": os.path.abspath(path), "sha256": sha, "task": task,
                       "rows": len(rows), "kept": len(self.specs), "skipped": len(skipped),
                       "by_type": dict(sorted(by_type.items())),
                       "skipped_rows": skipped[:1000]}   # the first 1000 with their reasons
        # rows without a target frame: no frame reward, SFT target or frame accuracy
        if task == "grounding":
            self.report["no_target_frame"] = sum(sp.get("target_frame") is None
                                                 for sp in self.specs)
        if not self.specs:
            why = (f"; all {len(rows)} rows are bad, e.g. row {skipped[0]['row']}: "
                   f"{skipped[0]['reason']}") if skipped else ""
            raise DataError(f"{path}: no usable rows{why}")
        if skipped:
            print(describe(self.report, max_skipped=3), file=sys.stderr)
        self[0]   # (4)

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
                frames = _stack([read_image(p) for p in sp["paths"]], where)
                c2g, K = sp["cam2global"], sp["intrinsics"]
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: cannot read media: {e}") from e
        keys = ("boxes", "description", "target_frame", "target_box", "world_box", "question",
                "options", "ground_truth", "question_type")
        return Sample(id=sp["id"], task=sp["task"], frames=frames, intrinsics=K, cam2global=c2g,
                      axis_align=sp["axis_align"], meta=dict(sp["meta"]),
                      **{k: sp[k] for k in keys if k in sp})


def load_dataset(task, path, media_root=None, frames=None, skip_bad=False):
    """A Dataset of Samples from a VG-LLM JSON (detection: scannet_det_*.json, grounding:
    scanrefer_*.json; image paths relative to media_root) or VSI-Bench rows (spatial:
    JSON/JSONL/parquet; video at {media_root}/{dataset}/{scene_name}.mp4 or a frame folder
    {dataset}/{scene_name}/). frames: uniformly subsample a row's images to this many (None = all;
    32 for videos). A bad file raises a ValueError naming it; a bad row one naming the file and
    row; with skip_bad=True bad rows are skipped and listed, with their row numbers and reasons, in
    .report (see RowDataset). An empty result is an error either way."""
    return RowDataset(task, path, media_root, frames, skip_bad)


def parse_files(items):
    """Command-line files -> [(path, weight)]. Each item is PATH or PATH:WEIGHT with WEIGHT a whole
    number >= 1 (default 1), e.g. `--data a.json:2 b.json:1`. The weight is read only when the text
    after the last ':' is a number, so a path that contains ':' still works (give such a path
    ending in ':<number>' a ':1')."""
    out = []
    for item in items:
        path, sep, tail = item.rpartition(":")
        try:
            w = float(tail) if sep else None
        except ValueError:
            w = None   # 'C:\\data\\x.json', 'host:path': the ':' belongs to the path
        if w is None:
            out.append((item, 1))
        elif w.is_integer() and w >= 1:   # (nan and inf are not integers)
            out.append((path, int(w)))
        else:
            raise ValueError(f"{item}: the weight after ':' must be a whole number >= 1 "
                             f"(e.g. a.json:2 b.json:1), got {tail!r}")
    return out


def load_files(task, paths, media_root=None, frames=None, skip_bad=False):
    """Several files as one dataset, their rows end to end in the order given -> (dataset,
    [report per file])."""
    parts = [load_dataset(task, p, media_root, frames, skip_bad) for p in paths]
    dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    return dataset, [d.report for d in parts]


def describe(report, max_skipped=10):
    """A report as log lines: file, SHA-256, counts, then the first skipped rows with reasons."""
    if "sha256" not in report:   # not a file (e.g. the synthetic scenes): its parameters
        return "data: " + ", ".join(f"{k} {v}" for k, v in report.items())
    types = ", ".join(f"{t} {n}" for t, n in report["by_type"].items())
    unframed = report.get("no_target_frame") or 0
    head = (f"data: {report['path']} (sha256 {report['sha256'][:16]}): {report['rows']} rows, "
            f"{report['kept']} used ({types})")
    if unframed:
        head += (f", {unframed} without a target frame (no frame reward, SFT target or frame "
                 "accuracy)")
    if report["skipped"]:
        head += f", {report['skipped']} skipped:"
    lines = [head] + [f"  row {s['row']}: {s['reason']}"
                      for s in report["skipped_rows"][:max_skipped]]
    if report["skipped"] > max_skipped:
        lines.append(f"  ... and {report['skipped'] - max_skipped} more (the first 1000 are in the "
                     f"run's data report)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# 3. Export to VG-LLM / VSI-Bench layouts, drawing boxes
# --------------------------------------------------------------------------------------------------
DET_TEXT = ("Detect the 3D bounding boxes in the camera coordinate system of the first frame.\n"
            "Output a json list where each entry contains the object name in \"label\" and its 3D "
            "bounding box in \"bbox_3d\".\nThe 3D bounding box format should be [x_center, "
            "y_center, z_center, x_size, y_size, z_size, yaw, roll, pitch].")
GROUND_TEXT = ("Localize the first clear frame in the video showing the object described in the "
               "text.\nText: {}\nOutput a JSON dictionary with the frame index in \"frame\" and "
               "its 3D bounding box in \"bbox_3d\" in the frame's coordinates.\n")


def export_vgllm(dataset, out_dir, image_format="png"):
    """Write a dataset as VG-LLM JSON (detection.json, grounding.json) or VSI-Bench JSONL
    (spatial.jsonl) + media/synthetic/{scene}/{k:05d}.{png|jpg} with {k:05d}.txt poses and
    intrinsic.txt (a ScanNet posed folder). Image paths in rows are relative to out_dir/media. PNG
    keeps the round trip exact."""
    if len(dataset) == 0:
        raise ValueError("nothing to export: the dataset is empty")
    rows = []
    for i in range(len(dataset)):
        s = dataset[i]
        scene = re.sub(r"[^A-Za-z0-9_.-]", "_", s.id)
        images = _export_media(s, out_dir, scene, image_format)
        rows.append(_export_row(s, scene, images))
    path = os.path.join(out_dir, "spatial.jsonl" if s.task == "spatial" else f"{s.task}.json")
    with open(path, "w") as f:
        if s.task == "spatial":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return path


def _export_media(s, out_dir, scene, image_format):
    """A sample's frames as the posed folder out_dir/media/synthetic/{scene}/ -> the image paths
    relative to out_dir/media."""
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
    return images


def _round2(box):
    return [round(float(x), 2) for x in box]


def _export_row(s, scene, images):
    """A sample as a row of VG-LLM's JSON (detection, grounding) or VSI-Bench's JSONL (spatial)."""
    meta = {"dataset": "synthetic", "scene": scene,   # + what the scene knows (objects, room, ...)
            **{k: s.meta[k] for k in ("objects", "room", "label", "target") if k in s.meta}}
    K4 = np.eye(4)
    K4[:3, :3] = s.intrinsics if s.intrinsics is not None else np.eye(3)
    cams = {"cam2img": K4.tolist() if s.intrinsics is not None else None,
            "cam2global": s.cam2global.tolist(), "axis_align_matrix": s.axis_align.tolist()}
    if s.task == "detection":
        dets = [json.dumps({"label": b["label"], "bbox_3d": _round2(b["bbox_3d"])})
                for b in s.boxes]
        answer = "```json\n[\n\t" + ",\n\t".join(dets) + "\n]```"
        human = "<image>\n" * len(images) + DET_TEXT
        return {"id": s.id, "images": images, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": answer}],
            "boxes": s.boxes, **cams, "metadata": meta}
    if s.task == "grounding":
        prompt = GROUND_TEXT.format(s.description)
        target, answer = None, ""   # a val-style row: only the world box (gt_bbox), no answer
        if s.target_frame is not None:
            target = {"frame": s.target_frame, "bbox_3d": s.target_box}
            answer = f"```json\n\t{json.dumps(dict(target, bbox_3d=_round2(s.target_box)))}\n```"
        tokens = "".join(f"Frame-{k}: <image>" for k in range(len(images)))
        return {"id": s.id, "images": images, "conversations": [
            {"from": "human", "value": f"{tokens}\n{prompt}"}, {"from": "gpt", "value": answer}],
            "metadata": {**meta, "question_type": "unique" if s.meta.get("unique") else "multiple",
                         "object_id": s.meta.get("target")},
            "target": target, "gt_bbox": s.world_box, "prompt": prompt, **cams}
    return {"id": s.id, "dataset": "synthetic", "scene_name": scene,
            "question_type": s.question_type, "question": s.question, "options": s.options,
            "ground_truth": s.ground_truth, "axis_align_matrix": s.axis_align.tolist(),
            "metadata": meta}


EDGES = [(i, i | b) for i in range(8) for b in (1, 2, 4) if not i & b]


def draw_boxes(frames, intrinsics, cam2global, boxes, pred_boxes=(), box_frame=0, axis_align=None,
               scale=4, colors=((60, 255, 60), (255, 60, 255))):
    """Frames side by side (upscaled) with projected 3D box edges: ground truth in colors[0],
    predictions in colors[1]. Boxes ({"label","bbox_3d"} or 9-lists) live in camera `box_frame`
    or, with box_frame="world", in the aligned world (E_k = axis_align @ cam2global[k]); both
    groups share that frame, so move grounding predictions (camera f_pred) to the world first
    (box_to_world(box, axis_align @ cam2global[f_pred])). Returns a PIL image."""
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
                T = np.eye(4) if cam2global is None else \
                    np.linalg.inv(cam2global[k]) @ cam2global[box_frame]
            for group, color in ((boxes, colors[0]), (pred_boxes, colors[1])):
                for b in group:
                    _draw_box(draw, b, T, intrinsics, scale, color)
        canvas.paste(panel, (k * W * scale, 0))
    return canvas


def _draw_box(draw, b, T, intrinsics, scale, color):
    """One box ({"label","bbox_3d"} or a 9-list), moved into the camera by T: its 12 edges, clipped
    at the near plane z = 0.05, and its label when the whole box is in front of that plane."""
    label, box = (b.get("label", ""), b["bbox_3d"]) if isinstance(b, dict) else ("", b)
    c = box_corners(box) @ T[:3, :3].T + T[:3, 3]            # corners in the camera
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
