"""Training end to end on the tiny default: GRPO pitfalls on a real model, DDP == 1 process,
FSDP2 == DDP, exact resume, and SFT -> GRPO -> eval.py exiting cleanly with finite metrics."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import compare
import decoding
import eval as evaluation
import grpo
import rft3d
import scenes
import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--val-size", "2", "--frames", "2", "--max-new-tokens", "16", "--micro-batch", "2",
        "--warmup", "1", "--test-size", "0"]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A tiny random model + tokenizer, built once for this module."""
    out = tmp_path_factory.mktemp("init")
    args = train.get_args(["--out", str(out), "--frames", "2"])
    return train.tiny_init(args, rank=0)


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
# GRPO pitfalls on the real model


def test_step0_ratio_is_one_and_kl_is_zero(init_dir):
    """Policy == reference and pi_old == pi_theta at step 0, dropout off: ratio exactly
    1, KL exactly 0 (mu = 2 stores logp_old from a separate no-grad pass, so this
    compares two different forwards)."""
    net, tok = checkpoints.load_pretrained(init_dir)
    ref, _ = checkpoints.load_pretrained(init_dir)
    ref.requires_grad_(False).eval()
    samples = [scenes.SyntheticDataset("detection", 4, seed=5, frames=2)[i] for i in range(2)]
    args = SimpleNamespace(G=3, temperature=0.7, max_new_tokens=12, beta=0.1, eps_low=0.2,
                           eps_high=0.2, mu=2, adv_scale="group", agg="token", micro_batch=4,
                           max_grad_norm=1.0, reward_opts={})
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.0)
    out = grpo.grpo_step(net, ref, tok, rft3d.TASKS["detection"], samples, opt, args)
    assert out["ratio"] == 1.0 and out["kl"] == 0.0 and out["clip_frac"] == 0.0
    assert out["completion_tokens"] > 0 and len(out["_texts"]) == 6


def test_sampling_logprobs_equal_scoring_logprobs(init_dir):
    """The distribution the tokens were sampled from (transformers' processed scores at
    temperature T) equals what model.forward scores at the same T: no temperature
    mismatch, no off-by-one shift."""
    net, tok = checkpoints.load_pretrained(init_dir)
    net.eval()
    samples = [scenes.SyntheticDataset("grounding", 2, seed=1, frames=2)[i] for i in range(2)]
    enc = net.encode([s.frames for s in samples])
    prompts = [rft3d.TASKS["grounding"].prompt(s, think=True) for s in samples]
    batch = net.prompt_batch(tok, prompts, enc)
    T = 0.6
    torch.manual_seed(0)
    with torch.no_grad():
        out = net.qwen.generate(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
            generation_config=decoding.generation_config(net, 10, T), output_scores=True,
            return_dict_in_generate=True, **net.mm_inputs(batch["image_grid_thw"], enc))
    P = batch["input_ids"].shape[1]
    completion = out.sequences[:, P:]
    sampled = torch.stack([torch.log_softmax(s.float(), -1).gather(1, completion[:, j:j + 1])[:, 0]
                           for j, s in enumerate(out.scores)], 1)  # [B, C]
    seq, mask = grpo.sequence_batch(net, tok, prompts, enc, completion)
    with torch.no_grad():
        scored = net(**seq, encodings=enc, temperature=T)[:, P - 1:]
    m = mask[:, P - 1:].bool()
    assert m.sum() > 0
    torch.testing.assert_close(scored[m], sampled[m], atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Distributed equivalence and exact resume (train.py as users run it)


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
# End to end: SFT, then GRPO, then eval.py


def strict(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_sft_then_grpo_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--stage", "sft", "--task", "grounding", "--steps", "2", "--batch-size", "2",
                "--out", str(out), *FAST])
    # starts from the SFT model in out/sft/best
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
    for name, path in (("SFT start", out / "sft/best"), ("GRPO", out / "grpo/best")):
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
        grpo.grpo_step(policy, None, tok, rft3d.TASKS["detection"], samples, opt, args)
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


# ------------------------------------------------------------------------------------------------
# eval.py under torchrun: each rank on its own device, every record gathered once


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


def test_eval_two_ranks_gather_every_record_once(init_dir, tmp_path):
    """torchrun --nproc_per_node 2 eval.py on 5 scenes (an odd count: rank 1's shard is padded with
    a repeat that must be dropped): predictions.jsonl holds each scene exactly once, in order, and
    the same greedy completions as one process decoding all 5."""
    common = ["--ckpt", init_dir, "--task", "detection", "--test-size", "5", "--frames", "2",
              "--max-new-tokens", "12", "--batch-size", "2"]
    torchrun(2, [*common, "--out", str(tmp_path / "two")], tmp_path, script="eval.py")
    evaluation.main([*common, "--out", str(tmp_path / "one")])
    read = lambda d: [json.loads(x)
                      for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
    two, one = read("two"), read("one")
    assert [r["index"] for r in two] == [0, 1, 2, 3, 4]
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
    assert json.loads((tmp_path / "two/metrics.json").read_text())["n"] == 5


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
# What RL does to the policy: greedy, sampled and best of G


def test_sampled_evaluation_at_a_vanishing_temperature_is_greedy(init_dir):
    """eval.evaluate(samples=n): n records per scene, ordered by (scene, sample), decoded from the
    prompt repeated n times. At T = 1e-5 the tempered distribution puts all its mass on the argmax,
    so every sample is the greedy completion; at T = 1 the samples differ from each other."""
    net, tok = checkpoints.load_pretrained(init_dir)
    test = scenes.SyntheticDataset("detection", 3, seed=2, frames=2)
    greedy = evaluation.evaluate(net, tok, "detection", test, max_new_tokens=12)["records"]
    torch.manual_seed(0)
    cold = evaluation.evaluate(net, tok, "detection", test, max_new_tokens=12, samples=4,
                               temperature=1e-5, batch_size=5)["records"]
    assert [(r["index"], r["sample"]) for r in cold] == [(i, j) for i in range(3) for j in range(4)]
    assert [r["completion"] for r in cold] == [g["completion"] for g in greedy for _ in range(4)]
    hot = evaluation.evaluate(net, tok, "detection", test, max_new_tokens=12, samples=4)["records"]
    assert len({r["completion"] for r in hot}) > 3


def test_eval_command_samples(init_dir, tmp_path):
    """eval.py --samples 3: three records per scene in predictions.jsonl, metrics over all nine."""
    evaluation.main(["--ckpt", init_dir, "--test-size", "3", "--frames", "2", "--max-new-tokens",
                     "8", "--samples", "3", "--temperature", "0.7", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(3)]
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 9
    with pytest.raises(SystemExit):
        evaluation.main(["--ckpt", init_dir, "--samples", "-1"])


def test_eval_command_scores_a_shifted_world(init_dir, tmp_path):
    """eval.py's world flags (bench.py's shifted test worlds): the test scenes are drawn with the
    given pitch, objects and frames (checked against the scenes drawn directly), and metrics.json
    says which world it scored."""
    world = dict(frames=3, pitch=15.0, max_objects=2)
    evaluation.main(["--ckpt", init_dir, "--test-size", "8", "--frames", "3", "--pitch", "15",
                     "--max-objects", "2", "--max-new-tokens", "8", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    drawn = scenes.SyntheticDataset("detection", 8, seed=2, **world)
    assert [r["n_gt"] for r in rows] == [len(s.boxes) for s in drawn]
    assert {len(s.boxes) for s in drawn} == {1, 2} and all(len(s.frames) == 3 for s in drawn)
    report = json.loads((tmp_path / "metrics.json").read_text())["data"][0]
    assert {k: report[k] for k in world} == world


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


def test_sampled_mean_and_best_of_n_per_scene():
    """compare.sampled: per-scene metrics of n samples -> their mean, and best of n: the one sample
    with the highest main metric, every metric that sample's own (2 scenes x 3 samples of a
    spatial score, written out; then the issue's detection scene: a 3-box answer at IoU 0.8 over
    GT and a 1-box answer at 0.1 is best at 0.8 with 3 boxes and the count wrong, never a mix)."""
    scores = [0.0, 1.0, 0.5, 0.2, 0.2, 0.2]
    records = [{"score": x, "parsed": True} for x in scores]
    mean, best = compare.sampled("spatial", records, 3)
    assert mean["score"].tolist() == pytest.approx([0.5, 0.2])
    assert best["score"].tolist() == [1.0, 0.2] and mean["parse"].tolist() == [1.0, 1.0]
    det = lambda n_pred, iou: {"counts": {"0.25": {}, "0.5": {}}, "n_pred": n_pred, "n_gt": 1,
                               "iou_gt": iou, "parsed": True}
    mean, best = compare.sampled("detection", [det(3, 0.8), det(1, 0.1)], 2)
    assert (best["iou_gt"][0], best["boxes"][0], best["count"][0]) == (0.8, 3.0, 0.0)
    assert mean["count"][0] == 0.5


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


def test_eval_samples_are_seeded_per_rank(init_dir, tmp_path):
    """eval.py --samples --seed 3 under torchrun: rank r draws from seed 3 + r (unseeded, every rank
    drew torch's one default stream), so each rank's samples equal an in-process evaluation of its
    scene after torch.manual_seed(3 + r); --viz writes one PNG per sample, not one per scene."""
    torchrun(2, ["--ckpt", init_dir, "--task", "detection", "--test-size", "2", "--frames", "2",
                 "--max-new-tokens", "10", "--samples", "2", "--batch-size", "2", "--viz", "4",
                 "--seed", "3", "--out", str(tmp_path)], tmp_path, script="eval.py")
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    net, tok = checkpoints.load_pretrained(init_dir)
    test = scenes.SyntheticDataset("detection", 2, seed=2, frames=2)
    for rank in (0, 1):  # scene r is rank r's shard
        torch.manual_seed(3 + rank)
        alone = evaluation.evaluate(net, tok, "detection", [test[rank]], max_new_tokens=10,
                                    samples=2, batch_size=2)["records"]
        assert [r["completion"] for r in rows if r["index"] == rank] == [
            r["completion"] for r in alone], rank
    assert len(list(tmp_path.glob("viz-*.png"))) == 4


def test_training_curves_draw_every_term(tmp_path):
    """curves.png from a metrics.jsonl with reward terms, KL, entropy, a skipped step's nulls and an
    evaluation line: the figure has the five panels and each reward term's line."""
    rows = [{"step": k, "reward": 1 + k / 10, "reward_format": 0.9, "reward_iou": 0.1 * k,
             "reward_std": 0.3, "kl": None if k == 2 else 0.01 * k, "entropy": 1.0}
            for k in range(1, 6)] + [{"step": 5, "eval/f1@0.25/micro": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(compare, "plot", lambda path, panels, **kw: drawn.extend(panels))
        compare.training_curves(tmp_path / "c.png", tmp_path / "metrics.jsonl", "f1@0.25/micro",
                                "detection", 100, smooth=2)
    titles = [t for t, _ in drawn]
    assert len(drawn) == 5 and set(drawn[1][1]) == {"format", "iou"}, titles
    assert drawn[2][1]["KL"][1] == pytest.approx([0.01, 0.01, 0.03, 0.035, 0.045])
    compare.training_curves(tmp_path / "c.png", tmp_path / "metrics.jsonl", "f1@0.25/micro",
                            "detection", 100)
    assert (tmp_path / "c.png").stat().st_size > 0
