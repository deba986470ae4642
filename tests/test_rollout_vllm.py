"""rollout_vllm.py: --rollout vllm against rft3d's own decode loop (vLLM in its own venv)."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import grpo
import lora
import rft3d
import rollout_vllm
import scenes
import train
from test_train import torchrun


# fp32 on both sides, the same weights, the same fused embeddings: the two differ only in the order
# of float32 sums (vLLM's attention and matmul kernels vs transformers'). Measured on the tiny
# default: at most 1e-6 on log-probs of -2 to -8 (prompts of ~65 tokens, 40 new ones); 1e-4 leaves
# that 100x room and still catches any real mismatch (a wrong temperature, a suppressed token left
# in the softmax, an off-by-one position: each moves log-probs by 1e-2 or more).
LOGP_ATOL = 1e-4
NEW_TOKENS = 24


def test_missing_vllm_says_what_to_install(monkeypatch, capsys):
    """Without vLLM, --rollout vllm stops at the command line (exit 2, before any warm-up) and the
    engine's own import says the same; --shard fsdp is refused with it."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm'):
        rollout_vllm.import_vllm()
    for flags, said in ((["--rollout", "vllm"], 'pip install -e ".[vllm'),
                        (["--rollout", "vllm", "--shard", "fsdp"], "use --shard ddp")):
        with pytest.raises(SystemExit) as e:
            train.get_args([*flags, "--out", "/tmp/never-written"])
        assert e.value.code == 2 and said in capsys.readouterr().err


def tiny_init(tmp_path_factory, *flags):
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("init")
    return train.tiny_init(train.get_args(["--out", str(out), "--frames", "2", *flags]), rank=0)


def tiny(path):
    net, tok = checkpoints.load_pretrained(path)
    return net.eval(), tok


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return tiny_init(tmp_path_factory)


@pytest.fixture(scope="module")
def geo(init_dir):
    """(policy, tokenizer, engine): the tiny default with geometry and its engine, started once."""
    net, tok = tiny(init_dir)
    return net, tok, rollout_vllm.Engine(net, tok, seed=0)


def prompts(net, tok, task="detection", n=2, seed=5):
    samples = [scenes.SyntheticDataset(task, n, seed=seed, frames=2)[i] for i in range(n)]
    enc = net.encode([s.frames for s in samples])
    texts = [rft3d.TASKS[task].prompt(s, think=True) for s in samples]
    return samples, enc, texts, net.prompt_batch(tok, texts, enc)


def assert_greedy_equal(net, tok, engine, task):
    """Each prompt twice (as GRPO's groups repeat them): the engine gets one request per prompt."""
    _, enc, texts, _ = prompts(net, tok, task)
    enc, texts = [e for e in enc for _ in range(2)], [t for t in texts for _ in range(2)]
    batch = net.prompt_batch(tok, texts, enc)
    own = net.generate(batch, enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = engine.generate(batch, enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(own, theirs)


@pytest.mark.parametrize("task", ["detection", "grounding"])
def test_greedy_equals_own_loop_with_geometry(geo, task):
    assert_greedy_equal(*geo, task)


@pytest.fixture(scope="module")
def no_geometry(tmp_path_factory, geo):
    """The tiny default without VGGT and a second engine in the same process. Module-scoped like
    the first: vLLM keeps its parallel state in globals, and an engine that is garbage collected
    tears them down under any other engine of the process (one engine per process, as in
    training, never meets this)."""
    net, tok = tiny(tiny_init(tmp_path_factory, "--no-geometry"))
    return net, tok, rollout_vllm.Engine(net, tok, seed=0)


def test_greedy_equals_own_loop_without_geometry(no_geometry):
    assert no_geometry[0].merger is None
    assert_greedy_equal(*no_geometry, "detection")


def test_sampled_logprobs_equal_policy(geo):
    """The engine samples from the distribution GRPO scores: each sampled token's log-prob under
    vLLM (temperature T, suppressed tokens masked) equals model.forward's at T."""
    net, tok, engine = geo
    _, enc, texts, batch = prompts(net, tok)
    G, T = 3, 0.7
    enc_G, texts_G = [e for e in enc for _ in range(G)], [t for t in texts for _ in range(G)]
    batch_G = net.prompt_batch(tok, texts_G, enc_G)
    completion, theirs = engine.generate(batch_G, enc_G, NEW_TOKENS, temperature=T,
                                         return_logprobs=True)
    assert completion.shape[0] == len(enc_G)
    seq, mask = grpo.sequence_batch(net, tok, texts_G, enc_G, completion)
    with torch.no_grad():
        mine = net(**seq, encodings=enc_G, temperature=T)[:, seq["first_position"]:]
    m = mask[:, seq["first_position"]:].bool()
    assert m.sum() > 0
    assert (mine[m] - theirs[m]).abs().max().item() < LOGP_ATOL
    suppressed = torch.tensor(net.config["suppress_token_ids"])
    assert not torch.isin(completion[m], suppressed).any()


def test_lora_pushes_merged_weights(geo, init_dir):
    """With LoRA adapters (train.py --lora-rank) the engine gets base + B A, the weights the policy
    computes with: the same greedy tokens."""
    _, tok, engine = geo
    net, _ = tiny(init_dir)
    lora.apply_lora(net, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_B.normal_(std=0.05)  # B = 0 at first: an exact no-op, nothing to see
    policy = engine.model
    engine.model = net
    try:
        engine.push_weights()
        assert_greedy_equal(net.eval(), tok, engine, "detection")
    finally:
        engine.model = policy
        engine.push_weights()


def test_grpo_steps_then_engine_answers_as_the_updated_policy(geo):
    """k GRPO steps through grpo_step's hook (rollouts on the engine, weights pushed before each
    one): the policy moved, and the engine's greedy answer and its sampled log-probs are the
    updated policy's."""
    net, tok, engine = geo
    rollout_vllm._ENGINES[net] = engine  # the sampler finds this engine for this policy
    before = {k: v.clone() for k, v in rollout_vllm.llm_weights(net)}
    samples = [scenes.SyntheticDataset("detection", 4, seed=7, frames=2)[i] for i in range(2)]
    hp = grpo.GRPOConfig(G=3, max_new_tokens=NEW_TOKENS, beta=0.0, micro_batch=6,
                         sampler=rollout_vllm.sampler(net, tok))
    # The random tiny model earns the detection reward of 0 on every sample, so every advantage
    # would be 0 and nothing would move: reward the completion's length instead, which varies.
    task = SimpleNamespace(prompt=rft3d.TASKS["detection"].prompt,
                           reward=lambda sample, text: {"total": float(len(text))})
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-3)
    for _ in range(3):
        out, _ = grpo.grpo_step(net, None, tok, task, samples, opt, hp)
        assert out["completion_tokens"] > 0
    net.eval()
    moved = max((v - before[k]).abs().max().item() for k, v in rollout_vllm.llm_weights(net))
    assert moved > 1e-4
    engine.push_weights()  # what the next rollout would do first
    assert_greedy_equal(net, tok, engine, "detection")
    test_sampled_logprobs_equal_policy(geo)


def test_two_ranks_torchrun(init_dir, tmp_path):
    """train.py --rollout vllm under torchrun with 2 ranks (DDP): an engine per rank beside the
    process group, every rank's rollouts in lock-step through 2 GRPO steps, a clean exit."""
    out = tmp_path / "run"
    argv = ["--stage", "grpo", "--task", "detection", "--model", init_dir, "--steps", "2",
            "--rollout", "vllm", "--G", "4", "--prompts-per-rank", "1", "--val-size", "2",
            "--frames", "2", "--max-new-tokens", "16", "--micro-batch", "4", "--warmup", "1",
            "--test-size", "0", "--eval-every", "100", "--save-every", "100", "--out", str(out)]
    r = torchrun(2, argv, tmp_path)  # exit code 0, else its output
    assert "Traceback" not in r.stderr
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "completion_tokens" in row]
    assert len(steps) == 2 and all(row["completion_tokens"] > 0 for row in steps)
