"""safety.py: kills and --resume, damaged checkpoints, atomic dirs, bad flags, strict logs."""
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import data
import eval as evaluation
import rft3d
import safety
import scenes
import train
from test_checkpoints import corrupt_tensor_bytes
from test_train import FAST, ROOT, assert_bit_identical, assert_resume_exact, params


# The main command at toy size: an SFT warm-up of 6 steps (a checkpoint and an evaluation every
# step), then 3 GRPO steps with a checkpoint every step.
MAIN = ["--stage", "grpo", "--task", "detection", "--sft-steps", "6", "--steps", "3",
        "--batch-size", "2", "--G", "2", "--prompts-per-rank", "2", "--save-every", "1",
        "--lr", "1e-2", *FAST]
# An untrained model earns reward 0 on every completion (no gradient: GRPO would not move and any
# resume would look exact), so a stand-in reward that varies with the text replaces the detection
# reward, here and in the killed process.
def varied(sample, text, **_):
    return {"total": (len(text) % 7) / 7, "format": 0.0}


DRIVER = f"""import sys, rft3d, train
{inspect.getsource(varied)}
rft3d.TASKS["detection"] = rft3d.TASKS["detection"]._replace(reward=varied)
train.main(sys.argv[1:])
"""
TIMING = {"step_time", "rollout_time", "tokens_per_s"}


def main_with_varied_reward(argv):
    """The main command in this process (train.main), with the stand-in reward."""
    with pytest.MonkeyPatch.context() as m:
        m.setitem(rft3d.TASKS, "detection", rft3d.TASKS["detection"]._replace(reward=varied))
        train.main(argv)


def strict_jsonl(path):
    """Every line parses as RFC 8259 JSON (Python's json accepts NaN and
    Infinity: refuse them here)."""
    def no_constants(name):
        raise ValueError(f"{path}: non-JSON literal {name}")
    return [json.loads(line, parse_constant=no_constants)
            for line in Path(path).read_text().splitlines()]


def start_main(out, argv, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv, "--out", str(out)],
                            cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def kill_when(out, argv, marker):
    """Start the main command (python -c DRIVER: train.main in a fresh process) and SIGKILL it as
    soon as `marker` exists (a checkpoint renamed into place)."""
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = start_main(out, argv, log)
        deadline = time.time() + 600  # a hang guard, not a timing assertion
        while not marker.exists():
            assert proc.poll() is None, f"finished before {marker} appeared"
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL


def fresh_out(tmp_path, init_dir):
    """An --out with the shared init/ in place (what the main command builds
    first; built once to save time)."""
    out = tmp_path / "run"
    shutil.copytree(init_dir, out / "init")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, init_dir):
    """The main command uninterrupted."""
    out = fresh_out(tmp_path_factory.mktemp("reference"), init_dir)
    main_with_varied_reward([*MAIN, "--out", str(out)])
    return out


# ------------------------------------------------------------------------------------------------
# Kill the main command, run it again with --resume: the same final weights, bit for bit (CPU)


def test_kill_during_warmup_then_resume(tmp_path, init_dir, reference, capsys):
    out = fresh_out(tmp_path, init_dir)
    kill_when(out, MAIN, out / "sft" / "step-2")
    assert not (out / "sft" / "final").exists(), "the kill came after the warm-up"
    # the same command line without --resume: exit 2, a message naming what is there and what to
    # do, no traceback, nothing deleted
    before = sorted(p.name for p in (out / "sft").iterdir())
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *MAIN, "--out", str(out)],
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr and "step-2" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "sft").iterdir()) == before
    capsys.readouterr()
    # the warm-up continues, then GRPO
    main_with_varied_reward([*MAIN, "--resume", "--out", str(out)])
    # resumed, not restarted
    assert f"continuing sft from {out / 'sft' / 'step-'}" in capsys.readouterr().out
    assert_bit_identical(out / "sft" / "final", reference / "sft" / "final")
    assert_bit_identical(out / "grpo" / "final", reference / "grpo" / "final")
    # GRPO moved: the check has teeth
    assert not all(torch.equal(v, params(reference / "sft" / "final")[k])
                   for k, v in params(reference / "grpo" / "final").items())
    steps = [r["step"] for r in strict_jsonl(out / "sft" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_kill_during_grpo_then_resume(tmp_path, init_dir, reference):
    out = fresh_out(tmp_path, init_dir)
    kill_when(out, MAIN, out / "grpo" / "step-1")
    assert (out / "sft" / "final").exists() and not (out / "grpo" / "final").exists()
    main_with_varied_reward([*MAIN, "--resume", "--out", str(out)])
    assert_bit_identical(out / "grpo" / "final", reference / "grpo" / "final")
    # metrics.jsonl: strict JSON, each step once, the same values as the
    # uninterrupted run (timings aside)
    rows, ref_rows = (strict_jsonl(out / "grpo" / "metrics.jsonl"),
                      strict_jsonl(reference / "grpo" / "metrics.jsonl"))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert ([r["step"] for r in rows if "loss" not in r]
            == [r["step"] for r in ref_rows if "loss" not in r])
    drop = lambda r: {k: v for k, v in r.items() if k not in TIMING}
    assert [drop(r) for r in rows] == [drop(r) for r in ref_rows]


def test_resume_is_bit_exact(init_dir, tmp_path, monkeypatch):
    """GRPO stopped after 1 step and resumed equals 2 uninterrupted steps, bit for bit
    (CPU): optimiser moments, sampling RNG and data position all come back. An untrained
    model earns reward 0 everywhere (no gradient at all), so a stand-in reward that varies
    with the text makes the steps move."""
    task = rft3d.TASKS["detection"]
    varied = lambda sample, text, **_: {"total": (len(text) % 7) / 7, "format": 0.0}
    monkeypatch.setitem(rft3d.TASKS, "detection", task._replace(reward=varied))
    common = ["--stage", "grpo", "--task", "detection", "--model", init_dir, "--G", "2",
              "--prompts-per-rank", "2", "--eval-every", "100", "--save-every", "1", "--lr", "1e-2",
              "--mu", "2", *FAST]
    assert_resume_exact(common, "grpo", tmp_path)


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints: --resume falls back to the newest intact one
# and says which it skipped and why


SFT = ["--stage", "sft", "--task", "detection", "--save-every", "1", "--keep", "3",
       "--batch-size", "2", "--eval-every", "100", *FAST]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, init_dir):
    """An uninterrupted 3-step SFT run and one stopped after 2 steps
    (checkpoints step-1 and step-2)."""
    base, init = tmp_path_factory.mktemp("sft"), str(init_dir)
    train.main([*SFT, "--model", init, "--steps", "3", "--out", str(base / "full")])
    train.main([*SFT, "--model", init, "--steps", "2", "--out", str(base / "stopped")])
    return init, base


def tear(path):
    Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])


DAMAGE = {
    "torn state.pt": lambda d: tear(d / "state.pt"),
    "flipped weight bytes": lambda d: corrupt_tensor_bytes(d / "model" / "model.safetensors", 0.5),
    "empty config.json": lambda d: (d / "model" / "config.json").write_text(""),
    "NaN weights, no checksums": lambda d: (corrupt_tensor_bytes(d / "model" / "model.safetensors"),
                                            (d / "model" / "checksums.json").unlink()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back(sft_runs, tmp_path, capsys, damage):
    init, base = sft_runs
    out = tmp_path / "run"
    shutil.copytree(base / "stopped", out)
    DAMAGE[damage](out / "sft" / "step-2")
    capsys.readouterr()
    train.main([*SFT, "--model", init, "--steps", "3", "--resume", "--out", str(out)])
    printed = capsys.readouterr().out
    assert (f"skipping {out / 'sft' / 'step-2'}" in printed
            and f"from {out / 'sft' / 'step-1'}" in printed)
    # set aside, not deleted, and not counted by --keep
    assert (out / "sft" / "damaged-step-2").is_dir()
    assert_bit_identical(out / "sft" / "final", base / "full" / "sft" / "final")
    steps = [r["step"] for r in strict_jsonl(out / "sft" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


def test_torn_init_is_named(tmp_path, capsys):
    """A 0-byte init/config.json (what a kill left before init/ was written
    atomically) names the file."""
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "config.json").write_text("")
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "sft", "--steps", "1", "--batch-size", "1",
                    "--out", str(tmp_path), *FAST])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "init" / "config.json") in err and "delete" in err


def test_tiny_init_leaves_nothing_half_written(tmp_path, monkeypatch):
    def killed(directory):
        # a kill after the files were written, before the directory was finished
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoints, "seal", killed)
    # a 3-scene tokenizer corpus: the corpus does not matter here, time does
    few = scenes.SyntheticDataset
    monkeypatch.setattr(scenes, "SyntheticDataset", lambda task, n, **kw: few(task, 3, **kw))
    with pytest.raises(KeyboardInterrupt):
        train.tiny_init(train.get_args(["--out", str(tmp_path), "--frames", "2"]), rank=0)
    assert not (tmp_path / "init").exists()


def test_replace_dir_replaces_a_full_directory(tmp_path):
    old, new = tmp_path / "best", tmp_path / ".tmp-best"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    safety.replace_dir(new, old)
    assert (sorted(p.name for p in tmp_path.iterdir()) == ["best"]
            and (old / "b").read_text() == "new")


def test_a_kill_between_the_renames_loses_nothing(tmp_path, monkeypatch):
    """replace_dir moves final/ aside, then renames the new one in: a kill between the two
    left .old-final and no final/. The next reader (a GRPO run starting from sft/final, a later
    save) puts the old one back."""
    sft = tmp_path / "sft"
    (sft / "final").mkdir(parents=True)
    (sft / "final" / "config.json").write_text("old")
    (sft / ".tmp-final").mkdir()
    real_replace = os.replace

    def killed_after_first(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".old-final":
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        safety.replace_dir(sft / ".tmp-final", sft / "final")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (sft / "final").exists()  # the window
    start = train.start_point(train.get_args(["--stage", "grpo", "--out", str(tmp_path)]))
    assert Path(start) == sft / "final" and (sft / "final" / "config.json").read_text() == "old"
    assert not (sft / ".old-final").exists()


def test_lora_resume_starts_fresh_moments_and_says_so(tmp_path, init_dir, monkeypatch, capsys):
    """A LoRA checkpoint holds merged weights; --resume re-applies fresh adapters. AdamW's saved
    moments belonged to the merged-away adapters (same shapes, so loading them raised nothing): the
    resumed optimiser must start without them, and the run says it is not bit-exact."""
    common = ["--stage", "sft", "--task", "detection", "--model", str(init_dir), "--lora-rank", "2",
              "--batch-size", "2", "--save-every", "1", "--eval-every", "100",
              "--out", str(tmp_path), *FAST]
    train.main([*common, "--steps", "1"])
    moments = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (moments.append(len(self.state)),
                                               step(self, *a, **k))[1])
    capsys.readouterr()
    train.main([*common, "--steps", "2", "--resume"])
    assert moments[0] == 0, "stale moments were loaded onto fresh adapters"
    assert "adapters and AdamW's moments start fresh" in capsys.readouterr().out


def test_skipped_steps_are_logged_and_counted(tmp_path, init_dir, monkeypatch):
    """A step whose gradient norm is non-finite (loss finite) is skipped and logged as
    skipped (grad_norm null); --max-bad-steps of them in a row stop the run. An inf norm
    used to count as a good step."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: torch.tensor(float("inf")))
    common = ["--stage", "sft", "--task", "detection", "--model", str(init_dir),
              "--batch-size", "2", "--eval-every", "100", *FAST]
    train.main([*common, "--steps", "2", "--out", str(tmp_path / "a")])
    rows = [r for r in strict_jsonl(tmp_path / "a/sft/metrics.jsonl") if "loss" in r]
    assert [(r["skipped"], r["grad_norm"]) for r in rows] == [(1, None), (1, None)]
    assert_bit_identical(tmp_path / "a/sft/final", init_dir)  # the weights never saw a step
    with pytest.raises(RuntimeError, match="2 skipped steps in a row"):
        train.main([*common, "--steps", "3", "--max-bad-steps", "2", "--out", str(tmp_path / "b")])


# ------------------------------------------------------------------------------------------------
# Flags, a used --out, a bad data file: exit code 2 or 1, the cause named, no traceback


BAD_FLAGS = [
    ["--steps", "0"], ["--steps", "-3"], ["--sft-steps", "0"], ["--lr", "0"], ["--lr", "-1e-3"],
    ["--lr", "nan"], ["--lr-merger", "0"], ["--keep", "-1"], ["--keep", "0"], ["--G", "1"],
    ["--G", "0"], ["--micro-batch", "0"], ["--batch-size", "0"], ["--prompts-per-rank", "0"],
    ["--frames", "0"], ["--val-size", "0"], ["--mu", "0"], ["--max-new-tokens", "0"],
    ["--eval-every", "0"], ["--save-every", "0"], ["--temperature", "0"], ["--beta", "-0.1"],
    ["--eps-low", "1"], ["--eps-high", "-0.1"], ["--max-grad-norm", "0"], ["--warmup", "-1"],
    ["--f1-iou", "1"], ["--f1-iou", "-0.5"],
    ["--seed", "-1"], ["--log-every", "0"], ["--max-bad-steps", "0"], ["--model", "/no/such/dir"],
    ["--data", "/no/such/file.json"], ["--qwen", "/no/such/dir"], ["--vggt", "/no/such/file"],
]


@pytest.mark.parametrize("flag", BAD_FLAGS, ids=" ".join)
def test_bad_flag_exits_2_naming_it(flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args([f"{flag[0]}={flag[1]}", "--out", "/tmp/never-written"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag[0]} {flag[1]}" in err or f"error: {flag[0]} {float(flag[1])}" in err, err


def test_a_new_seed_refuses_another_seeds_init(tmp_path, capsys):
    """RESULTS' seed-2 column once printed seed 0's SFT start digit for digit: the SFT data order of
    fresh scenes does not depend on --seed, so a --seed 2 run into an --out whose init/ seed 0 had
    built (only sft/ and grpo/ deleted) silently repeated seed 0's warm-up. init/ records its seed,
    and a run that asks for another refuses before anything is read or written."""
    common = ["--out", str(tmp_path), "--frames", "2"]
    train.tiny_init(train.get_args(common), rank=0)
    safety.check_out(train.get_args(common), warmup=True)  # the same seed: fine
    with pytest.raises(SystemExit) as e:
        train.main(["--seed", "2", *common])
    assert e.value.code == 2
    assert "built with --seed 0 and this run asks for --seed 2" in capsys.readouterr().err
    checkpoints.verify(tmp_path / "init")  # init.json is listed in checksums.json


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "sft", "--resume", "--steps", "1", "--batch-size", "1",
                    "--out", str(tmp_path / "empty"),
                    *FAST])  # (tiny settings: if the check were missing this would train, quickly)
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err


def test_fresh_run_into_a_used_out_refuses_and_keeps_everything(tmp_path, capsys):
    (tmp_path / "sft" / "step-4").mkdir(parents=True)
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "sft", "--steps", "1", "--batch-size", "1",
                    "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--resume" in err and "step-4" in err
    assert ((tmp_path / "sft" / "step-4").is_dir()
            and (tmp_path / "sft" / "metrics.jsonl").read_text() == '{"step": 1}\n')


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_truncated_data_file_ends_in_one_line_naming_it(tmp_path, init_dir, script):
    """A truncated --data JSON ends like a bad flag: one line on stderr naming the file, no
    traceback, exit 1 (it used to print the same message after a 30-line traceback)."""
    path = data.export_vgllm(scenes.SyntheticDataset("detection", 2, seed=3, frames=2),
                             str(tmp_path))
    Path(path).write_text(Path(path).read_text()[:-40])
    argv = {"train.py": ["--stage", "sft", "--data", path, "--val-data", path,
                         "--model", str(init_dir), "--out", str(tmp_path / "o")],
            "eval.py": ["--ckpt", str(init_dir), "--data", path, "--frames", "2",
                        "--out", str(tmp_path / "o")]}[script]
    r = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path,
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and f"{path}: not valid JSON" in r.stderr


def test_real_data_without_validation_data_is_refused(tmp_path, capsys):
    """--data without --val-data used to validate on synthetic 56 px scenes and pick
    best/ (the GRPO start) by them. Now it stops before anything loads: exit 2, one line
    naming --data and what to add."""
    path = data.export_vgllm(scenes.SyntheticDataset("detection", 2, seed=3, frames=2),
                             str(tmp_path))
    with pytest.raises(SystemExit) as e:
        train.get_args(["--stage", "sft", "--data", path, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert (e.value.code == 2 and f"error: --data {path}" in err and "--val-data" in err
            and len(err.splitlines()) == 1)


# ------------------------------------------------------------------------------------------------
# Logs, threads


def test_log_lines_are_strict_json_and_truncated_on_resume(tmp_path):
    assert json.loads(safety.json_line({"loss": float("nan"), "x": [float("inf"), 1.5],
                                        "e": {"f": -math.inf}})) == \
        {"loss": None, "x": [None, 1.5], "e": {"f": None}}
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": NaN}\n{"step": 2}\n{"step": 3}\n'
                   '{"step": 2, "eval/f1": 1}\n{"step": 4, "lo')
    safety.truncate_log(log, 2)
    assert strict_jsonl(log) == [{"step": 1, "loss": None}, {"step": 2}, {"step": 2, "eval/f1": 1}]


def test_thread_default(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("the default applies on CPU machines")
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        safety.set_threads()
        assert torch.get_num_threads() == 1 and "threads: 1 per process" in capsys.readouterr().out
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        safety.set_threads()  # the user's choice stands
        assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS=2" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


# ---- the process: each torchrun rank bound to its GPU before the group starts -------------------


class Started(Exception):
    pass


@pytest.mark.parametrize("main", [train.main, evaluation.main], ids=["train", "eval"])
def test_each_rank_is_bound_to_its_gpu_before_the_process_group(init_dir, tmp_path, monkeypatch,
                                                                main):
    """As torchrun's rank 1 of 2 on a (pretended) GPU machine: the process binds cuda:1
    (torch.cuda.set_device) before the process group starts, and tells the group its device. eval.py
    did neither, so every rank's NCCL all_gather_object landed on cuda:0 and NCCL refused."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: calls.append(("set_device", torch.device(d))))

    def init_process_group(backend, **kw):
        calls.append(("init", backend, kw.get("device_id")))
        raise Started
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    argv = {train.main: ["--stage", "sft", "--model", init_dir, "--out", str(tmp_path), *FAST],
            evaluation.main: ["--ckpt", init_dir, "--test-size", "2", "--frames", "2"]}[main]
    with pytest.raises(Started):
        main(argv)
    assert calls == [("set_device", torch.device("cuda", 1)),
                     ("init", "nccl", torch.device("cuda", 1))]
