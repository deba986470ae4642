"""train.py: training end to end on the tiny default (DDP, FSDP2, SFT -> GRPO -> eval)."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import data
import eval as evaluation
import grpo
import rft3d
import scenes
import train


ROOT = Path(__file__).resolve().parents[1]
FAST = ["--val-size", "2", "--frames", "2", "--max-new-tokens", "16", "--micro-batch", "2",
        "--warmup", "1", "--test-size", "0"]
# init_dir (the tiny default's init/, built once per module): conftest.py


def params(run_dir):
    """All tensors of a saved model directory."""
    state = {}
    for f in sorted(Path(run_dir).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_same_params(a, b, atol):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    worst = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    assert worst <= atol, f"max parameter difference {worst}"


def assert_bit_identical(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def assert_resume_exact(common, stage, tmp_path):
    """Two steps uninterrupted == one step, stopped, then resumed to two: the same final weights bit
    for bit (CPU), and the run did move (the final weights differ from step 1's)."""
    train.main([*common, "--steps", "2", "--out", str(tmp_path / "a")])
    train.main([*common, "--steps", "1", "--out", str(tmp_path / "b")])
    train.main([*common, "--steps", "2", "--resume", "--out", str(tmp_path / "b")])
    assert_same_params(tmp_path / f"a/{stage}/final", tmp_path / f"b/{stage}/final", atol=0.0)
    assert not torch.equal(params(tmp_path / f"a/{stage}/final")["merger.mlp.0.weight"],
                           params(tmp_path / f"a/{stage}/step-1/model")["merger.mlp.0.weight"])


def torchrun(nproc, argv, tmp, script="train.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / script), *argv]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


# ------------------------------------------------------------------------------------------------
# Distributed equivalence (train.py as users run it)


def test_ddp_two_processes_equal_one_with_accumulation(init_dir, tmp_path):
    common = ["--stage", "sft", "--task", "detection", "--model", init_dir, "--steps", "3",
              "--train-size", "64", "--eval-every", "100", "--save-every", "100", *FAST]
    torchrun(2, [*common, "--batch-size", "2", "--out", str(tmp_path / "ddp")], tmp_path)
    torchrun(2, [*common, "--batch-size", "2", "--shard", "fsdp", "--out", str(tmp_path / "fsdp")],
             tmp_path)
    # 2 micro-batches of 2
    train.main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    assert_same_params(tmp_path / "ddp/sft/final", tmp_path / "one/sft/final", atol=1e-5)
    assert_same_params(tmp_path / "fsdp/sft/final", tmp_path / "ddp/sft/final", atol=1e-5)
    assert not torch.equal(params(tmp_path / "one/sft/final")["merger.mlp.0.weight"],
                           params(init_dir)["merger.mlp.0.weight"])  # it did train


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_grpo_runs_under_torchrun(init_dir, tmp_path, shard):
    """Each rank owns whole groups; FSDP generation stays in lock-step
    (synced_gpus) and does not hang."""
    torchrun(2, ["--stage", "grpo", "--task", "spatial", "--model", init_dir, "--steps", "2",
                 "--G", "2", "--prompts-per-rank", "2", "--shard", shard, "--out", str(tmp_path),
                 *FAST], tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward" in x] == [1, 2]
    assert all(math.isfinite(x["loss"]) for x in lines if "loss" in x)


# ------------------------------------------------------------------------------------------------
# End to end: SFT, then GRPO, then eval.py


def strict(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_sft_then_grpo_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--stage", "sft", "--task", "grounding", "--steps", "2", "--batch-size", "2",
                "--out", str(out), *FAST])
    # starts from the SFT model in out/sft/final (the warm-up's end)
    train.main(["--stage", "grpo", "--task", "grounding", "--steps", "2", "--G", "2",
                "--prompts-per-rank", "2", "--out", str(out), *FAST, "--test-size", "3"])
    # one run is one training seed: each table says so and claims nothing (DESIGN.md section 9)
    printed = capsys.readouterr().out
    assert printed.count("not a claim") == 3 and "standard errors)" not in printed
    sft_rows = [json.loads(x) for x in (out / "sft/metrics.jsonl").read_text().splitlines()]
    # bench.py's wall time per arm reads it
    assert all(r["step_time"] > 0 for r in sft_rows if "loss" in r)
    lines = [json.loads(x) for x in (out / "grpo/metrics.jsonl").read_text().splitlines()]
    # the main command's last part: start vs GRPO on 3 test scenes, paired, and the curves
    report = json.loads((out / "grpo/report.json").read_text(), parse_constant=strict)
    assert report["test_size"] == 3 and {"greedy", "sampled", "best of 2"} <= set(report)
    assert report["float_path"]["world_size"] == 1 and report["float_path"]["torch"]
    per = json.loads((out / "grpo/per_scene.json").read_text(), parse_constant=strict)
    assert report["sampled"]["means"]["GRPO"]["iou"] == pytest.approx(
        sum(per["sampled"]["GRPO"]["iou"]) / 3)
    # its numbers, recomputed from eval.evaluate on the same models, scenes and sampling seed:
    # greedy and sampled means over every record; best of 2 per scene the sample with the
    # higher IoU, every metric that sample's own
    test = scenes.SyntheticDataset("grounding", 3, seed=2, frames=2)
    for name, path in (("SFT start", out / "sft/final"), ("GRPO", out / "grpo/best")):
        net, tok = checkpoints.load_pretrained(path)
        run = lambda **kw: evaluation.evaluate(net, tok, "grounding", test, max_new_tokens=16,
                                               **kw)["records"]
        greedy = run()
        torch.manual_seed(0 + 2)  # the report's stream: --seed + 2 + rank
        drawn = run(samples=2, temperature=1.0)
        iou = [r["iou"] if r["iou"] is not None else 0.0 for r in drawn]
        best = [max((0, 1), key=lambda j: (iou[2 * i + j], -j)) + 2 * i for i in range(3)]
        means = {way: report[way]["means"][name] for way in ("greedy", "sampled", "best of 2")}
        assert means["greedy"]["iou"] == pytest.approx(
            sum(r["iou"] or 0.0 for r in greedy) / 3)
        assert means["sampled"]["iou"] == pytest.approx(sum(iou) / 6)
        assert means["sampled"]["parse"] == pytest.approx(
            sum(bool(r["parsed"]) for r in drawn) / 6)
        assert means["best of 2"]["iou"] == pytest.approx(sum(iou[k] for k in best) / 3)
        assert means["best of 2"]["parse"] == pytest.approx(
            sum(bool(drawn[k]["parsed"]) for k in best) / 3)
    assert (out / "grpo/curves.png").stat().st_size > 0
    for key in ("reward", "reward_std", "zero_std_frac", "kl", "clip_frac", "ratio", "entropy",
                "completion_len", "truncated", "reward_format", "reward_frame", "reward_iou", "lr",
                "grad_norm", "step_time", "tokens_per_s"):
        assert key in lines[0] and math.isfinite(lines[0][key]), key
    evaluation.main(["--ckpt", str(out / "grpo/final"), "--task", "grounding", "--test-size", "3",
                     "--frames", "2", "--max-new-tokens", "16", "--viz", "2",
                     "--out", str(tmp_path / "ev")])
    metrics = json.loads((tmp_path / "ev/metrics.json").read_text())
    for key in ("acc@0.25", "acc@0.5", "iou", "frame_acc", "parse_rate"):
        assert math.isfinite(metrics[key]), key
    assert len((tmp_path / "ev/predictions.jsonl").read_text().splitlines()) == 3
    assert len(list((tmp_path / "ev").glob("viz-*.png"))) == 2


def test_mix_trains_and_resumes_bit_exactly(init_dir, tmp_path):
    a = data.export_vgllm(scenes.SyntheticDataset("detection", 5, seed=11, frames=2),
                          str(tmp_path / "a"))
    b = data.export_vgllm(scenes.SyntheticDataset("detection", 3, seed=12, frames=2),
                          str(tmp_path / "b"))
    common = ["--stage", "sft", "--task", "detection", "--model", init_dir, "--data", f"{a}:2",
              f"{b}:1", "--val-data", str(b), "--batch-size", "3", "--save-every", "1",
              "--eval-every", "100", "--lr", "1e-2", *FAST]
    assert_resume_exact(common, "sft", tmp_path)
    starts = json.loads((tmp_path / "b/sft/data.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [0, 1] and starts[1]["mix"] == [[5, 2], [3, 1]]
    for start in starts:
        assert [f["sha256"] for f in start["train"]] == [
            hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b)]
        assert [f["rows"] for f in start["train"]] == [5, 3] and start["val"][0]["rows"] == 3


def test_batch_defaults_are_per_step_over_ranks(monkeypatch):
    """The defaults keep 16 SFT samples / 4 GRPO prompts per optimiser step whatever
    torchrun's world size, so `--nproc_per_node 2` is the README recipe run faster; an
    explicit value stays per rank."""
    for world, (batch, prompts) in {"1": (16, 4), "2": (8, 2), "4": (4, 1), "8": (2, 1)}.items():
        monkeypatch.setenv("WORLD_SIZE", world)
        args = train.get_args(["--stage", "grpo"])
        assert (args.batch_size, args.prompts_per_rank) == (batch, prompts), world
        # the warm-up's own parse
        assert train.get_args(["--stage", "grpo"], stage="sft").batch_size == batch
    assert train.get_args(["--batch-size", "3", "--prompts-per-rank", "5"]).batch_size == 3


# ------------------------------------------------------------------------------------------------
# FSDP2 with bf16 mixed precision keeps encode-once and the shared prefill


def _fsdp_bf16_worker(rank, init_dir, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net, tok = checkpoints.load_pretrained(init_dir)
        args = train.get_args(["--shard", "fsdp", "--bf16", "--G", "4", "--max-new-tokens", "6",
                               "--micro-batch", "4", "--beta", "0"])
        policy = train.wrap(net, args, torch.device("cpu"))
        assert isinstance(policy, FSDPModule), "not sharded: the test would measure DDP"
        prefilled, merged = [], []
        # the prefill is the one call of the language model with a cache
        # (scoring passes run without one)
        net.qwen.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: (prefilled.append(kw["inputs_embeds"].shape[0])
                              if kw.get("use_cache") else None),
            with_kwargs=True)
        net.merger.register_forward_hook(lambda *_: merged.append(1))
        samples = [scenes.SyntheticDataset("detection", 4, seed=5 + rank, frames=2)[i]
                   for i in range(2)]  # B = 2
        opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
        torch.manual_seed(rank)
        hp = train.grpo_config(args, None, tok, rank)
        grpo.grpo_step(policy, None, tok, rft3d.TASKS["detection"], samples, opt, hp)
        torch.save({"prefilled": prefilled, "merged": len(merged)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_keeps_encode_once_and_shared_prefill(init_dir, tmp_path):
    """Under --shard fsdp --bf16 FSDP2 casts forward inputs, and its cast rebuilds every
    dataclass: the Encoding objects G rows share became G distinct ones, so all B*G rows were
    prefilled and the trainable merger ran G times per prompt (same values, G times the work and
    activations). On two gloo ranks, one GRPO step of B = 2 prompts x G = 4 (one micro-batch): the
    rollout prefills B rows once, and the merger runs B times in the rollout and B times in the
    scoring forward, not B * G."""
    import torch.multiprocessing as mp
    mp.start_processes(_fsdp_bf16_worker, args=(init_dir, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["prefilled"] == [2], r
        assert r["merged"] == 2 + 2, r


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


# ------------------------------------------------------------------------------------------------
# The README's real-data recipe on fakes in the real layouts, under torchrun


def test_readme_real_data_commands_on_fakes_in_the_real_layouts(init_dir, tmp_path):
    """The README's "real thing" recipe at toy size on two gloo ranks: GRPO on ScanRefer-layout JSON
    with --val-data, FSDP2, bf16, gradient checkpointing; then eval.py on the validation file under
    torchrun. What a CPU cannot check (NCCL, CUDA graphs, real sizes) is listed in the README."""
    import data
    train_file = data.export_vgllm(scenes.SyntheticDataset("grounding", 4, seed=21, frames=2),
                                   str(tmp_path / "tr"))
    val_file = data.export_vgllm(scenes.SyntheticDataset("grounding", 3, seed=22, frames=2),
                                 str(tmp_path / "va"))
    media = str(tmp_path / "tr" / "media")
    # one media root
    (tmp_path / "va" / "media" / "synthetic").rename(tmp_path / "tr" / "media" / "val")
    rows = json.loads(Path(val_file).read_text())
    for r in rows:
        r["images"] = [p.replace("synthetic/", "val/", 1) for p in r["images"]]
    Path(val_file).write_text(json.dumps(rows))
    torchrun(2, ["--stage", "grpo", "--task", "grounding", "--model", init_dir,
                 "--data", train_file, "--val-data", val_file, "--media-root", media,
                 "--frames", "2", "--shard", "fsdp", "--bf16", "--grad-ckpt", "--G", "2",
                 "--prompts-per-rank", "1", "--micro-batch", "2", "--steps", "2",
                 "--max-new-tokens", "12", "--out", str(tmp_path / "run")], tmp_path)
    logged = [json.loads(x) for x in (tmp_path / "run/grpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2]
    assert all(r["skipped"] == 0 for r in logged if "reward" in r)
    # validated on the 3 rows of --val-data
    assert [r.get("eval/n") for r in logged if "eval/n" in r][-1] == 3
    torchrun(2, ["--ckpt", str(tmp_path / "run/grpo/final"), "--task", "grounding",
                 "--data", val_file, "--media-root", media, "--frames", "2",
                 "--max-new-tokens", "12", "--out", str(tmp_path / "ev")],
             tmp_path, script="eval.py")
    assert len((tmp_path / "ev/predictions.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------------
# What RL does to the policy: the closing report


def test_closing_report_starts_where_training_did(init_dir, tmp_path, monkeypatch):
    """The closing table's SFT start is loaded as training loaded it: `--qwen DIR --vggt FILE`
    (no start directory: it crashed on Path(None)) through from_qwen_and_vggt, and a VG-LLM dir as
    --model through from_vgllm (it went through load_pretrained). The loaders are stand-ins that
    record the call and return the tiny model."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(init_dir, out / "grpo/best")
    (out / "grpo/metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 1.0}) + "\n")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen/config.json").write_text("{}")
    (tmp_path / "vggt.pt").write_bytes(b"")
    (tmp_path / "vgllm").mkdir()
    (tmp_path / "vgllm/config.json").write_text(json.dumps({"use_vggt_feature": True}))
    loaded = []
    for name in ("from_qwen_and_vggt", "from_vgllm"):
        monkeypatch.setattr(checkpoints, name, lambda *a, _n=name, **kw: (
            loaded.append(_n), checkpoints.load_pretrained(init_dir))[1])
    common = ["--out", str(out), "--test-size", "2", "--G", "2", "--frames", "2",
              "--max-new-tokens", "6"]
    for start in (["--qwen", str(tmp_path / "qwen"), "--vggt", str(tmp_path / "vggt.pt")],
                  ["--model", str(tmp_path / "vgllm")]):
        args = train.get_args([*start, *common])
        train.report(args, train.start_point(args), 0, torch.device("cpu"))
    assert loaded == ["from_qwen_and_vggt", "from_vgllm"]
    assert json.loads((out / "grpo/report.json").read_text())["start"] == str(tmp_path / "vgllm")


# ------------------------------------------------------------------------------------------------
# Flags, the tiny default, the schedule


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


def test_f1_iou_flag_reaches_the_detection_reward():
    """train.py --f1-iou 0.5: the reward GRPO computes (task.reward with reward_opts) counts F1 at
    IoU 0.5; a box at IoU 3/7 (unit cubes 0.4 apart) is a hit by default and a miss there."""
    s = scenes.SyntheticDataset("detection", 1, seed=0)[0]
    box = list(s.boxes[0]["bbox_3d"])
    size = box[3:6]
    box[0] += 0.4 * size[0]  # shifted by 0.4 of its own width along x: IoU (1 - 0.4) / (1 + 0.4)
    assert box[6:] == [0, 0, 0]  # axis-aligned (this scene's box), so the shift's IoU is exact
    text = ('<think>t</think><answer>[{"label": "%s", "bbox_3d": %s}]</answer>'
            % (s.boxes[0]["label"], json.dumps(box)))
    reward = rft3d.TASKS["detection"].reward
    paper = reward(s, text, **train.get_args(["--out", "/tmp/never-written"]).reward_opts)
    strict = reward(s, text, **train.get_args(["--f1-iou", "0.5",
                                               "--out", "/tmp/never-written"]).reward_opts)
    assert paper["iou"] == strict["iou"] == pytest.approx(0.6 / 1.4)
    assert (paper["f1"], strict["f1"]) == (1.0, 0.0)


def test_skip_bad_reaches_the_reader(tmp_path):
    path = data.export_vgllm(scenes.SyntheticDataset("detection", 2, seed=3, frames=2),
                             str(tmp_path))
    rows = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps(rows + [{"images": 5}]))
    args = train.get_args(["--stage", "sft", "--data", path, "--val-data", path, "--skip-bad",
                           "--out", str(tmp_path / "o")])
    train_set, _, info = train.datasets(args)
    assert len(train_set) == 2 and info["train"][0]["skipped_rows"][0]["row"] == 2


def test_cosine_does_not_decay_during_warmup():
    args = SimpleNamespace(warmup=10, steps=30, schedule="cosine")
    assert [train.lr_factor(s, args) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert train.lr_factor(10, args) == 1.0  # the cosine starts where the warm-up ends
    assert train.lr_factor(20, args) == pytest.approx(0.5)  # half-way through the 20 cosine steps
    assert train.lr_factor(30, args) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_factor(5, SimpleNamespace(warmup=0, steps=10, schedule="constant")) == 1.0


def test_help_is_one_screen_and_help_all_has_every_flag(capsys):
    """`-h` keeps to the common flags (one screen); `--help-all` lists every flag train.py takes."""
    every = {o for a in train.parser(full=True)._actions for o in a.option_strings}
    with pytest.raises(SystemExit):
        train.get_args(["-h"])
    short = capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.get_args(["--help-all"])
    full = capsys.readouterr().out
    assert len(short.splitlines()) <= 55 and "--stage" in short and "--keep" not in short
    assert all(flag in full for flag in every) and len(every) > 50
