"""decoding.py: the fast decode loop that samples GRPO's rollouts and eval's greedy answers. Not
needed to understand 3D-RFT: model.VGLLM.generate calls generate() below in one line, and
transformers' own `generate` (hf_generate below) gives the same greedy tokens, only slower
(tests/test_decoding.py checks it; bench.py times both).

What it does, and why (measured on the tiny CPU default: 2.2x transformers' generate per rollout):
    - one shared prefill per distinct prompt: GRPO repeats each prompt G times, so it is prefilled
      once through transformers' Qwen2.5-VL and its keys/values are copied to the G rows (vLLM's
      prefix caching does the same);
    - a static KV cache (StaticKV) allocated once, written in place, instead of a cache grown by
      concatenation;
    - the sampler (pick, sample) draws from model.policy_logits, the very distribution forward()
      scores, with the suppressed tokens filled once per call, EOS bookkeeping on the device, and
      one host sync per DONE_CHECK_EVERY tokens (under FSDP an all-reduce of "done", so every rank
      runs the same steps);
    - on a GPU, each decoding step recorded once as a CUDA graph and replayed (one launch per
      token).

Layout: the loop's state (StaticKV, DecodeState); 1. generate() (decode) and hf_generate(), the
reference; 2. the loop's parts: prefill, pick, decode_step, fixed_buffers + step_graph (CUDA
graphs), sample.

Who calls it: model.VGLLM.generate (rollouts in grpo.py, greedy decoding in eval.py), tests,
bench.py. It imports nothing of rft3d: it drives the model through model.qwen, model.mm_inputs and
model.policy_logits.
"""
import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache, GenerationConfig, Qwen2_5_VLModel

# transformers 5.24 renamed the cache argument of its forwards from `past_key_values` to `cache`
# (the old name is deprecated until 5.40); the decode loop passes its cache under whichever name
# this version has.
CACHE_KWARG = ("cache" if "cache" in inspect.signature(Qwen2_5_VLModel.forward).parameters
               else "past_key_values")
DONE_CHECK_EVERY = 8  # the loop asks "has every row ended?" (a host sync) once per this many tokens
_GRAPHS = weakref.WeakKeyDictionary()  # model -> (shape key, fixed DecodeState, CUDA graph or None)


class StaticKV:
    """The decode loop's KV cache: per layer keys and values [B, H_kv, L, d_head] allocated once,
    L = prompt + new tokens, starting from the prefill's [B, H_kv, P, d_head]. transformers'
    attention calls update(k, v, layer_idx) with one position per row; it is written in place at
    `slot` and attention runs over all L slots, the additive mask hiding the empty ones and the left
    padding."""

    def __init__(self, keys, values, length, slot):
        # [B, H_kv, P, d] -> [B, H_kv, L, d], zeros after P
        grow = lambda t: F.pad(t, (0, 0, 0, length - t.shape[2]))
        self.keys, self.values = [grow(k) for k in keys], [grow(v) for v in values]
        # [1] long: where this step's keys/values go
        self.slot = torch.tensor([slot], device=keys[0].device)

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class DecodeState:
    """Everything a decoding step reads and writes, on the device. B rows, C = max_new_tokens, L
    cache slots."""
    hidden: torch.Tensor  # [B, d] the prefill's last prompt position (picks the first token)
    kv: StaticKV
    mask: torch.Tensor  # [B, 1, 1, L] additive attention mask: 0 on the prompt + tokens fed so far
    cos: torch.Tensor  # [B, C, d_head] rotary angles of the new positions
    sin: torch.Tensor
    slot: torch.Tensor  # [1] long = kv.slot: cache slot of this step's token (P at the first step)
    step: torch.Tensor  # [1] long: its completion column (then the next token's column)
    token: torch.Tensor  # [B] long: the last token picked
    finished: torch.Tensor  # [B] bool: EOS emitted
    completion: torch.Tensor  # [B, C] long, pad_token_id where nothing was written
    logp: torch.Tensor | None  # [B, C] float32: the sampler's log-prob per token (return_logprobs)
    suppress: torch.Tensor  # [n] long: suppressed_ids
    temperature: float
    do_sample: bool

    def tensors(self):  # the buffers a CUDA graph of the step reads and writes
        return [*self.kv.keys, *self.kv.values, self.mask, self.cos, self.sin, self.slot, self.step,
                self.token, self.finished, self.completion, self.suppress] + (
                    [self.logp] if self.logp is not None else [])


def _all_ranks_done(finished, synced_gpus):
    """Has every row ended (on every rank, under FSDP's lock-step)? The only host sync inside the
    token loop."""
    done = finished.all().int()
    if synced_gpus and dist.is_available() and dist.is_initialized():
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done)


# --------------------------------------------------------------------------------------------------
# 1. generate(): our decode loop; hf_generate(): transformers' generate, the reference
#
# transformers' generate spends most of a decoding step on the host: logits processors (the
# suppress-tokens isin), a cache that grows by concatenation, position and mask bookkeeping, and a
# stopping check that syncs every token. generate() keeps the loop on the device: the suppressed
# tokens are one precomputed index tensor, filled by the same policy_logits that forward() scores
# with, EOS bookkeeping is a tensor, keys/values go into a cache allocated once, and the host looks
# at a tensor value only every DONE_CHECK_EVERY steps. The two give the same greedy tokens
# (tests/test_decoding.py).

# CUDA graphs of the decoding step: "auto" = on a CUDA device unless FSDP shards the model (its
# per-layer all-gathers cannot be captured); True / False force it. A graph reads the parameters in
# place: optimiser steps and load_state_dict are seen by later replays, and new parameter tensors
# (apply_lora) make a new recording.
CUDA_GRAPHS = "auto"


def generation_config(model, max_new_tokens, temperature=1.0, do_sample=True):
    """transformers' generate settings for hf_generate: plain sampling at `temperature`, top_p 1
    and top_k 0 (transformers' default top_k is 50), no repetition penalty, the same suppressed
    tokens as suppressed_ids."""
    sampling = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else {}  # greedy
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                            repetition_penalty=1.0, eos_token_id=model.config["eos_token_id"],
                            pad_token_id=model.config["pad_token_id"],
                            suppress_tokens=model.config["suppress_token_ids"], use_cache=True,
                            **sampling)


@torch.no_grad()
def hf_generate(model, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True,
                synced_gpus=False):
    """transformers' own generate on the same inputs, same output contract as generate(): the
    reference that tests/test_decoding.py checks generate() against and bench.py times."""
    P = batch["input_ids"].shape[1]
    out = model.qwen.generate(input_ids=batch["input_ids"].to(model.device),
                              attention_mask=batch["attention_mask"].to(model.device),
                              mm_token_type_ids=batch["mm_token_type_ids"].to(model.device),
                              generation_config=generation_config(model, max_new_tokens,
                                                                  temperature, do_sample),
                              synced_gpus=synced_gpus,
                              **model.mm_inputs(batch.get("image_grid_thw"), encodings))
    return out[:, P:]  # transformers writes pad_token_id after a row's EOS, as generate() does


@torch.no_grad()
def generate(model, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True,
             synced_gpus=False, return_logprobs=False):
    """Completion ids [B, C], C <= max_new_tokens: new tokens only, pad_token_id after the first
    EOS, and C where the last row ended (as transformers' generate). Samples policy_logits (logits /
    temperature, suppressed tokens at SUPPRESSED_LOGIT), forward()'s distribution, with top_p 1 and
    top_k 0; do_sample=False is greedy. For group sampling repeat the batch rows and the encodings
    list G times: nothing is re-encoded, each distinct prompt is prefilled once. synced_gpus
    (FSDP): all ranks stop at the same step. return_logprobs: also the sampler's own log-prob of
    each token [B, C] (the tests compare it with forward())."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # inference_mode: no autograd bookkeeping at all (a third less host time per small op than
    # no_grad on the tiny CPU default). Not under FSDP (synced_gpus): its unsharded parameters must
    # stay ordinary tensors.
    with torch.inference_mode(not synced_gpus):
        completion, logp = decode(model, batch, encodings, max_new_tokens,
                                  temperature if do_sample else 1.0, do_sample, synced_gpus,
                                  return_logprobs)
    # copies, made outside inference mode: ordinary tensors for the caller (the scoring forward
    # embeds them), and the CUDA-graph path reuses its buffers
    return (completion.clone(), logp.clone()) if return_logprobs else completion.clone()


def decode(model, batch, encodings, max_new_tokens, temperature, do_sample, synced_gpus,
           return_logprobs):
    """-> (completion [B, C], the sampler's log-probs [B, C] or None); generate() unwrapped."""
    graphs = CUDA_GRAPHS
    if graphs == "auto":
        graphs = (model.device.type == "cuda" and not synced_gpus
                  and not isinstance(model, FSDPModule))
    # 1. Prefill: the prompt's keys/values into a cache of P + C slots, the first token from its
    #    last position.
    s = prefill(model, batch, encodings, max_new_tokens, temperature, do_sample, return_logprobs,
                graphs)
    pick(model, s, s.hidden)
    # 2. One decoding step per token, the same device work every step. The host reads a tensor value
    #    only every DONE_CHECK_EVERY steps (one sync per k tokens, at most k - 1 steps wasted after
    #    the last row ended).
    step = (step_graph(model, s) if graphs and max_new_tokens > 1
            else functools.partial(decode_step, model, s))
    for t in range(1, max_new_tokens):
        step()
        if t % DONE_CHECK_EVERY == 0 and _all_ranks_done(s.finished, synced_gpus):
            break
    # 3. Cut where the last row ended: its first EOS, or max_new_tokens if a row never ended.
    is_eos = s.completion == model.config["eos_token_id"]
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new_tokens)
    C = int(ends.max())
    return s.completion[:, :C], (s.logp[:, :C] if return_logprobs else None)


# --------------------------------------------------------------------------------------------------
# 2. The loop's parts: one prefill through transformers, then token by token with a static KV cache
#
# Tried first, transformers' own static cache: generate(cache_implementation="static") works
# through the seam and gives the same greedy tokens, but on the tiny CPU default it was no faster
# than the dynamic cache (282-299 vs 253-286 ms for 16 rows x 32 tokens) and keeps the per-token
# host work above; filling a StaticCache from a shared prefill would mean writing its private
# counters. So the cache here is ours (StaticKV, 15 lines), the layers are transformers' own
# (called one by one: FSDP's per-layer hooks and LoRA wrappers keep working). Also tried on the
# CPU, not kept: torch.compile of the step (inductor: 129 s to compile, then 1.3x transformers'
# generate, less than this eager loop) and our own layer arithmetic in place of transformers'
# layers (12-14% faster per step: not worth a second copy of Qwen2's layer). On a CPU what is left
# of a step is transformers' layers, the same work in both loops.


def prefill(model, batch, encodings, max_new_tokens, temperature, do_sample, return_logprobs,
            graphs):
    """The prompt through transformers' Qwen2.5-VL (fused image embeddings through the
    mm_encoder_outputs seam, M-RoPE positions from get_rope_index, as transformers' generate) once
    per distinct (encoding, prompt) row: GRPO repeats each prompt G times, so one prefill and G
    copies of its keys/values (vLLM's prefix caching does the same). Returns the DecodeState with
    the prompt in cache slots [0, P)."""
    dev = model.device
    ids, mask, types = (batch[k].to(dev)
                        for k in ("input_ids", "attention_mask", "mm_token_type_ids"))
    B, P = ids.shape
    C = max_new_tokens
    encs = list(encodings) or [None] * B
    rows, copy_of, seen = [], [], {}  # rows: the prefilled rows; copy_of[b]: the one row b copies
    for b, key in enumerate(zip(map(id, encs),
                                map(tuple, torch.cat([ids, mask, types], 1).tolist()))):
        if key not in seen:
            seen[key] = len(rows)
            rows.append(b)
        copy_of.append(seen[key])
    copy_of = torch.tensor(copy_of, device=dev)  # [B]
    mm = model.mm_inputs(None, [encs[b] for b in rows]) if encodings else {}
    positions, _ = model.qwen.model.get_rope_index(ids[rows], types[rows], mm.get("image_grid_thw"),
                                                   attention_mask=mask[rows])  # [3, U, P]
    cache = DynamicCache()
    out = model.qwen.model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions,
                           use_cache=True, **{CACHE_KWARG: cache}, **mm)
    hidden = out.last_hidden_state[copy_of, -1]  # [B, d]: last prompt position -> first token

    # Decoding state. A CUDA graph replays fixed shapes: the cache is rounded up for other prompts.
    L = -(-(P + C) // 256) * 256 if graphs else P + C
    kv = StaticKV([c.keys[copy_of] for c in cache.layers],
                  [c.values[copy_of] for c in cache.layers], L, P)
    attn = torch.full((B, 1, 1, L), torch.finfo(kv.keys[0].dtype).min, dtype=kv.keys[0].dtype,
                      device=dev)
    attn[:, 0, 0, :P].masked_fill_(mask.bool(), 0.0)  # additive mask: the prompt but left padding
    # A generated (text) token advances all three M-RoPE axes by one from the last prompt position,
    # as in transformers' generate: the rotary angles of every new position, computed once.
    new_positions = positions[:, copy_of, -1:] + 1 + torch.arange(C, device=dev)  # [3, B, C]
    cos, sin = model.qwen.model.language_model.rotary_emb(hidden, new_positions)  # [B, C, d_head]
    zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)
    s = DecodeState(hidden=hidden, kv=kv, mask=attn, cos=cos, sin=sin, slot=kv.slot, step=zeros(1),
                    token=zeros(B), finished=zeros(B, dtype=torch.bool),
                    completion=zeros(B, C) + model.config["pad_token_id"],
                    logp=zeros(B, C, dtype=torch.float32) if return_logprobs else None,
                    suppress=model.suppressed_ids(dev), temperature=temperature,
                    do_sample=do_sample)
    return fixed_buffers(model, s) if graphs else s


def pick(model, s, hidden):
    """The next token of every row from its last hidden state [B, d], written to completion column
    s.step. Rows that already ended get padding."""
    z = model.policy_logits(hidden, s.temperature, s.suppress)  # [B, V] float32
    if s.do_sample:
        token = sample(torch.softmax(z, -1),
                       torch.rand(len(z), 1, dtype=torch.float64, device=z.device))
    else:
        token = z.argmax(-1)
    token = token.masked_fill(s.finished, model.config["pad_token_id"])
    s.completion.index_copy_(1, s.step, token[:, None])
    if s.logp is not None:
        s.logp.index_copy_(1, s.step, torch.log_softmax(z, -1).gather(1, token[:, None]))
    s.finished |= token == model.config["eos_token_id"]
    s.token.copy_(token)


def decode_step(model, s):
    """One token for every row, on the device and the same work every step (no host sync, no branch
    on a tensor value, fixed shapes), so it can be captured as a CUDA graph: the last token through
    transformers' decoder layers at its cache slot, then the next token from the new logits."""
    lm = model.qwen.model.language_model
    s.mask.index_fill_(3, s.slot, 0.0)  # the slot written in this step is visible from now on
    x = lm.embed_tokens(s.token)[:, None]  # [B, 1, d]
    rope = (s.cos.index_select(1, s.step), s.sin.index_select(1, s.step))  # [B, 1, d_head]
    for layer in lm.layers:
        x = layer(x, attention_mask=s.mask, position_embeddings=rope, **{CACHE_KWARG: s.kv})
    s.slot += 1
    s.step += 1
    pick(model, s, lm.norm(x)[:, 0])


def fixed_buffers(model, s):
    """A CUDA graph reads and writes fixed addresses: keep one DecodeState per shape (outside the
    module, so state_dict and deepcopy never see it) and copy each call's values into it."""
    key = (tuple((t.shape, t.dtype) for t in s.tensors()), s.temperature, s.do_sample,
           torch.is_autocast_enabled(s.mask.device.type),
           tuple(map(id, model.parameters())))  # new parameters (apply_lora, merge_lora): new graph
    kept = _GRAPHS.get(model)
    if kept is None or kept[0] != key:
        _GRAPHS[model] = (key, s, None)  # a new buffer set: its graph is recorded by step_graph
        return s
    for dst, src in zip(kept[1].tensors(), s.tensors()):
        dst.copy_(src)
    kept[1].hidden = s.hidden
    return kept[1]


def step_graph(model, s):
    """decode_step recorded as a CUDA graph on the fixed buffers s, once per buffer set; returns its
    replay: one launch per token instead of one per kernel. As CUDA graphs require, warm-up steps
    run first on a side stream; each is undone (the cache slot it wrote stays hidden by the restored
    mask). Autocast's weight cache is off while recording, or the graph would keep reading the
    weights as they were cast at capture time."""
    key, kept, graph = _GRAPHS[model]
    assert kept is s, "step_graph needs the buffers of fixed_buffers"
    if graph is None:
        state = [s.mask, s.slot, s.step, s.token, s.finished, s.completion] + (
            [s.logp] if s.logp is not None else [])
        saved = [t.clone() for t in state]
        undo = lambda: [t.copy_(v) for t, v in zip(state, saved)]
        amp = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                   enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast(**amp):
            for _ in range(3):
                decode_step(model, s)
                undo()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast(**amp):
            decode_step(model, s)
        undo()  # recording runs no kernels, but keep the state exactly as the prefill left it
        _GRAPHS[model] = (key, s, graph)
    return graph.replay


def sample(probs, u):
    """One token per row of probs [B, V] by inverse CDF: the first token whose cumulative
    probability exceeds u * total, with u [B, 1] uniform in [0, 1) (float64). One random number per
    row, where torch.multinomial draws one exponential per vocabulary entry (150k per row for Qwen,
    most of a tiny model's sampling time on a CPU); a fixed number of device ops, no host sync. A
    zero-probability (suppressed) token is never drawn: its CDF step is empty, and u * total is
    kept strictly below the total."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [B, V], non-decreasing
    total = cdf[:, -1:]
    x = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0]
