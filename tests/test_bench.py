"""bench.py's learning arms: which model an arm stands for, and its validation value."""
import json

import bench


def test_a_grpo_start_is_the_warm_up_s_end(tmp_path):
    """The main command starts GRPO from the warm-up's final/ (train.start_point), so bench's start
    arm must evaluate final/ and report its last validation value, not the best one."""
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "eval/f1@0.25/micro": 60.0},
            {"step": 3, "eval/f1@0.25/micro": 75.0}, {"step": 4, "eval/f1@0.25/micro": 70.0}]
    for name in ("start", "arm"):
        (tmp_path / name / "sft").mkdir(parents=True)
        (tmp_path / name / "sft" / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    start = bench.Arm(tmp_path, "start", "detection", "sft", [], [], ckpt="final")
    arm = bench.Arm(tmp_path, "arm", "detection", "sft", [], [])
    assert start.val() == 70.0 and arm.val() == 75.0
    (tmp_path / "start" / "sft" / "final").mkdir()  # trained: only the evaluation is left to do
    (name, [cmd], _), = start.jobs()
    assert cmd[cmd.index("--ckpt") + 1] == tmp_path / "start" / "sft" / "final"
