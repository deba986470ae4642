"""Robustness of the main command (issue 12): kills at any moment and `--resume` give the same
final weights as an uninterrupted run, damaged checkpoints are named and skipped, bad flags stop
with exit code 2 and a message naming the flag, logs are strict JSON without duplicate steps, and
the review fixes (schedule, warm-up LoRA, mu > 1 logs, rewards on empty scenes and out-of-video
frames, file modes, thread default)."""
import inspect
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import data
import grpo
import rewards
import rft3d
import safety
import scenes
import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--val-size", "2", "--frames", "2", "--max-new-tokens", "16", "--micro-batch", "2",
        "--warmup", "1", "--test-size", "0"]
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


def params(model_dir):
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_bit_identical(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


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


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """The tiny default's init/ (tokenizer + random model), built once for this module."""
    out = tmp_path_factory.mktemp("init")
    return Path(train.tiny_init(train.get_args(["--out", str(out), "--frames", "2"]), rank=0))


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


def corrupt_tensor_bytes(path, value=float("nan")):
    """Overwrite the first float32 tensor of a safetensors file with `value`, in
    place (header parsed by hand)."""
    raw = bytearray(Path(path).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name, info = next((k, v) for k, v in sorted(header.items())
                      if k != "__metadata__" and v["dtype"] == "F32")
    start, end = (8 + n + o for o in info["data_offsets"])
    raw[start:end] = struct.pack("<f", value) * ((end - start) // 4)
    Path(path).write_bytes(bytes(raw))
    return name


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


def test_nan_weights_are_refused_naming_the_file(tmp_path):
    net = __import__("model").VGLLM(__import__("model").tiny_config(64))
    checkpoints.save_pretrained(net, None, tmp_path)
    checkpoints.load_pretrained(tmp_path)  # intact: loads
    name = corrupt_tensor_bytes(tmp_path / "model.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match="model.safetensors") as e:
        checkpoints.load_pretrained(tmp_path)  # caught by the checksum written at save time
    assert str(tmp_path) in str(e.value) and "sha256" in str(e.value)
    # a file from elsewhere: no checksums, the finiteness check catches it
    (tmp_path / "checksums.json").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="NaN") as e:
        checkpoints.load_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value) and name in str(e.value)


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
    """replace_dir moves best/ aside, then renames the new one in: a kill between the two
    left .old-best and no best/. The next reader (a GRPO run starting from sft/best, a later
    save) puts the old one back."""
    sft = tmp_path / "sft"
    (sft / "best").mkdir(parents=True)
    (sft / "best" / "config.json").write_text("old")
    (sft / ".tmp-best").mkdir()
    real_replace = os.replace

    def killed_after_first(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".old-best":
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        safety.replace_dir(sft / ".tmp-best", sft / "best")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (sft / "best").exists()  # the window
    start = train.start_point(train.get_args(["--stage", "grpo", "--out", str(tmp_path)]))
    assert Path(start) == sft / "best" and (sft / "best" / "config.json").read_text() == "old"
    assert not (sft / ".old-best").exists()


def test_image_size_is_what_the_tiny_model_sees(tmp_path):
    """--image-size 112 builds a tiny model for 112 px frames: 16 x 16 patches of 7 px -> 64 image
    tokens a frame after the 2 x 2 merge (at 56 px: 16). It used to resize every frame back to
    56 px."""
    few = scenes.SyntheticDataset
    # a 3-scene tokenizer corpus: time, not the corpus, matters here
    with pytest.MonkeyPatch.context() as m:
        m.setattr(scenes, "SyntheticDataset", lambda task, n, **kw: few(task, 3, **kw))
        init = train.tiny_init(train.get_args(["--out", str(tmp_path), "--frames", "2",
                                               "--image-size", "112"]), 0)
    net, _ = checkpoints.load_pretrained(init)
    frames = scenes.SyntheticDataset("detection", 1, seed=0, frames=2, size=112)[0].frames
    assert frames.shape[1:3] == (112, 112)
    assert net.encode([frames])[0].n_tokens_per_image == [(112 // 7) ** 2 // 4] * 2


def test_fsdp_flag_in_one_process_runs_bf16_and_says_so(tmp_path, capsys):
    """`python train.py --shard fsdp --bf16` (no torchrun) has nothing to shard. It ran fp32
    (autocast was off for FSDP, and no FSDP cast applied) and said nothing; now it runs as the
    one-process model with bf16 autocast, exactly as --shard ddp --bf16 does, and says so."""
    common = ["--stage", "sft", "--task", "detection", "--steps", "1", "--batch-size", "2",
              "--train-size", "4", "--bf16", *FAST]
    train.main([*common, "--out", str(tmp_path / "ddp")])
    shutil.copytree(tmp_path / "ddp/init", tmp_path / "fsdp/init")
    capsys.readouterr()
    train.main([*common, "--shard", "fsdp", "--out", str(tmp_path / "fsdp")])
    assert "--shard fsdp outside torchrun" in capsys.readouterr().out
    shutil.copytree(tmp_path / "ddp/init", tmp_path / "fp32/init")
    train.main([*[c for c in common if c != "--bf16"], "--out", str(tmp_path / "fp32")])
    assert_bit_identical(tmp_path / "fsdp/sft/final", tmp_path / "ddp/sft/final")
    assert params(tmp_path / "fsdp/sft/final").keys() == params(tmp_path / "fp32/sft/final").keys()
    assert any(not torch.equal(a, b) for a, b in zip(params(tmp_path / "fsdp/sft/final").values(),
                                                     params(tmp_path / "fp32/sft/final").values()))


def test_validation_computes_in_the_training_dtype(tmp_path, init_dir, monkeypatch):
    """With --bf16 the periodic evaluation runs under the same bf16 autocast as the training steps
    (FSDP's bf16 parameters do the same there); it used to run outside it, in fp32, under DDP."""
    seen = []

    def evaluate(*args, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return {"metrics": {"f1@0.25/micro": 0.0}, "records": []}
    monkeypatch.setattr(train, "evaluate", evaluate)
    train.main(["--stage", "sft", "--task", "detection", "--model", str(init_dir), "--steps", "1",
                "--batch-size", "2", "--bf16", "--out", str(tmp_path), *FAST])
    assert seen == [True]


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


def _one_rank_nonfinite_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks, as DDP would hold them
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        before = [p.detach().clone() for p in net.parameters()]
        seen = []
        for bad_rank in (1, None):  # step 1: rank 1's gradient alone is NaN; step 2: all finite
            for p in net.parameters():
                p.grad = torch.full_like(p, math.nan if rank == bad_rank else 1.0)
            _, skipped = grpo.finish_step(net, opt, 1.0, max_grad_norm=1.0)
            seen.append((skipped, all(torch.equal(a, b) for a, b in zip(before, net.parameters()))))
        torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Two gloo ranks with local gradients (FSDP's shards, or a rank whose loss overflowed): rank
    1's gradient is NaN, rank 0's finite. Both ranks skip (a rank that stepped alone would
    desynchronise the replicas) and keep their weights; the next, finite step moves both."""
    import torch.multiprocessing as mp
    mp.start_processes(_one_rank_nonfinite_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert seen == [(True, True), (False, False)], rank


def test_saved_files_get_ordinary_permissions(tmp_path):
    net = __import__("model").VGLLM(__import__("model").tiny_config(64))
    checkpoints.save_pretrained(net, None, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes


# ------------------------------------------------------------------------------------------------
# Flags: exit code 2, the flag named, no traceback; an explicit 0 is never replaced by a default


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


def test_explicit_values_are_kept_and_the_warmup_is_full_finetuning():
    args = train.get_args(["--warmup", "0", "--train-size", "0", "--beta", "0", "--lora-rank", "4"])
    assert (args.warmup, args.train_size, args.beta, args.lora_rank) == (0, 0, 0.0, 4)
    warm = train.get_args(["--lora-rank", "4", "--resume"], stage="sft")
    assert warm.lora_rank == 0 and warm.resume and warm.stage == "sft"


def test_frame_window_flag_reaches_the_grounding_reward():
    assert train.get_args(["--task", "grounding"]).reward_opts == {"frame_window": "scaled"}
    assert (train.get_args(["--task", "grounding", "--frame-window", "fixed"]).reward_opts
            == {"frame_window": "fixed"})
    assert (train.get_args(["--task", "detection"]).reward_opts
            == {"iou_mode": "paper", "f1_iou": 0.25})


def test_skip_bad_reaches_the_reader(tmp_path):
    path = data.export_vgllm(scenes.SyntheticDataset("detection", 2, seed=3, frames=2),
                             str(tmp_path))
    rows = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps(rows + [{"images": 5}]))
    args = train.get_args(["--stage", "sft", "--data", path, "--val-data", path, "--skip-bad",
                           "--out", str(tmp_path / "o")])
    train_set, _, info = train.datasets(args)
    assert len(train_set) == 2 and info["train"][0]["skipped_rows"][0]["row"] == 2


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
# Logs, schedule, GRPO statistics, rewards, threads


def test_log_lines_are_strict_json_and_truncated_on_resume(tmp_path):
    assert json.loads(safety.json_line({"loss": float("nan"), "x": [float("inf"), 1.5],
                                        "e": {"f": -math.inf}})) == \
        {"loss": None, "x": [None, 1.5], "e": {"f": None}}
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": NaN}\n{"step": 2}\n{"step": 3}\n'
                   '{"step": 2, "eval/f1": 1}\n{"step": 4, "lo')
    safety.truncate_log(log, 2)
    assert strict_jsonl(log) == [{"step": 1, "loss": None}, {"step": 2}, {"step": 2, "eval/f1": 1}]


def test_cosine_does_not_decay_during_warmup():
    args = SimpleNamespace(warmup=10, steps=30, schedule="cosine")
    assert [train.lr_factor(s, args) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert train.lr_factor(10, args) == 1.0  # the cosine starts where the warm-up ends
    assert train.lr_factor(20, args) == pytest.approx(0.5)  # half-way through the 20 cosine steps
    assert train.lr_factor(30, args) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_factor(5, SimpleNamespace(warmup=0, steps=10, schedule="constant")) == 1.0


def test_mu_above_one_logs_the_ratio_of_the_last_pass(init_dir):
    net, tok = checkpoints.load_pretrained(init_dir)
    samples = [scenes.SyntheticDataset("detection", 4, seed=5, frames=2)[i] for i in range(2)]
    task = rft3d.TASKS["detection"]._replace(reward=varied)
    args = SimpleNamespace(G=4, temperature=1.0, max_new_tokens=12, beta=0.0, eps_low=0.2,
                           eps_high=0.2, mu=3, adv_scale="group", agg="token", micro_batch=8,
                           max_grad_norm=1.0, reward_opts={})
    torch.manual_seed(0)
    out = grpo.grpo_step(net, None, tok, task, samples,
                         torch.optim.SGD(net.trainable_parameters(), lr=50.0), args)
    # after 2 updates the policy is no longer the one that sampled (pass 0 logs 1 always)
    assert out["ratio"] != 1.0


def test_detection_reward_on_an_empty_scene():
    tagged = lambda a: f"<think>t</think><answer>{a}</answer>"
    assert rewards.detection_reward("garbage, no JSON", [])["total"] == 0.0  # was R_F1 = 1
    assert rewards.detection_reward(tagged("[{]"), [])["f1"] == 0.0
    # saying "nothing" is right: format + F1
    assert rewards.detection_reward(tagged("[]"), [])["total"] == 2.0
    # bare VG-LLM answer: F1 without format
    assert rewards.detection_reward("```json\n[]\n```", [])["f1"] == 1.0


def test_grounding_frame_outside_the_video_earns_nothing():
    box = [0, 0, 0, 1, 1, 1, 0, 0, 0]
    text = lambda f: f'<think>t</think><answer>{{"frame": {f}, "bbox_3d": {box}}}</answer>'
    poses = [[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]] * 2
    assert rewards.format_reward(text(2), "grounding", n_frames=2) == 0.0
    assert rewards.format_reward(text(1), "grounding", n_frames=2) == 1.0
    # was format 1 + frame 0.8
    assert rewards.grounding_reward(text(2), box, 1, poses)["total"] == 0.0
    assert rewards.grounding_reward(text(1), box, 1, poses)["total"] == pytest.approx(3.0)


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
