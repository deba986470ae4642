"""README.md's numbers against the code: the worked example of one GRPO group, and the reading
path's line counts (computed by bench.reading_path, the count the closing note quotes)."""
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import bench
import grpo
import rft3d
import scenes

README = (Path(__file__).parent.parent / "README.md").read_text()


def worked_example_rows():
    """The README's worked-example table -> [(completion text, format, iou, f1, total, A)]."""
    section = README.split("A worked example")[1].split("Every token")[0]
    rows = []
    for line in [x for x in section.splitlines() if x.startswith("| `")]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        shown = cells[0].strip("`")
        box = re.fullmatch(r"(\w+) (\[.*\])", shown)
        text = (shown if box is None else "<think>x</think><answer>" + json.dumps(
            [{"label": box[1], "bbox_3d": json.loads(box[2])}]) + "</answer>")
        number = lambda c: float(c.split()[0])
        rows.append((text, *map(number, cells[1:6])))
    return rows


def test_worked_example_is_what_the_code_returns():
    sample = scenes.SyntheticDataset("detection", 1, seed=2)[0]
    target_box = re.search(r"its box\s+`(\[[^`]*\])`", README)[1]
    assert target_box in rft3d.TASKS["detection"].target(sample)  # the SFT target's box
    rows = worked_example_rows()
    assert len(rows) == 4
    parts = [rft3d.TASKS["detection"].reward(sample, text) for text, *_ in rows]
    A, _ = grpo.group_advantages(torch.tensor([p["total"] for p in parts]), G=4)
    for (text, fmt, iou, f1, total, adv), p, a in zip(rows, parts, A.tolist()):
        got = (p["format"], p["iou"], p["f1"], p["total"], a)
        assert got == pytest.approx((fmt, iou, f1, total, adv), abs=5e-4), text


def test_reading_path_numbers_are_the_code_s():
    rows, (lines, chars) = bench.reading_path()
    for _, module, name, n_lines, _ in rows:  # the counter against inspect (decorators left out)
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        source = [x for x in inspect.getsource(obj).splitlines() if not x.lstrip().startswith("@")]
        assert n_lines == len(source), (module, name)
    table = README.split("## Reading path")[1].split("\n## ")[0]
    for row in table.splitlines():
        cells = [c.strip() for c in row.split("|")]
        if len(cells) > 3 and cells[1].isdigit():
            names = re.findall(r"`(\w+)\.py:([\w.]+)`", cells[2])
            counted = [r[3] for r in rows if r[0] == "stop" and (r[1], r[2]) in names]
            assert cells[3] == " + ".join(map(str, counted)), cells[2]
    said = re.search(r"([\d,]+) lines and ([\d,]+) characters", table)
    assert said and (int(said[1].replace(",", "")), int(said[2].replace(",", ""))) == (lines, chars)


def test_core_docstrings_stay_short():
    """Docstrings at most 15% of each core file's non-blank lines (caveats live in DESIGN.md)."""
    for name in bench.CORE:
        assert bench.docstring_share(Path(__file__).parent.parent / f"{name}.py") <= 0.15, name
