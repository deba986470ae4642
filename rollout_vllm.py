"""rollout_vllm.py: GRPO's rollouts on a vLLM engine (train.py --rollout vllm), fed rft3d's fused 3D
embeddings. Not needed to understand 3D-RFT: decoding.py's loop samples the same distribution and
stays the default and the reference; this file only lets a run hand its rollouts to the serving
engine the field scales GRPO with (paged attention, continuous batching, prefix caching).

What it does, and why:
    - one engine per rank, in this process, beside the policy (colocated). It is built from the
      policy's Qwen2.5-VL config with dummy weights, then the policy's LLM weights are pushed in:
      nothing goes through the disk, and the vision tower is never loaded, because the engine
      never sees a pixel;
    - the prompts go in as token ids with each frame's fused embeddings (vision + merger(geometry),
      model.VGLLM.image_embeds) through vLLM's precomputed image-embedding input for Qwen2.5-VL
      (`enable_mm_embeds`, `{"image": {"image_embeds", "image_grid_thw"}}`): the fusion happens
      before the LLM, so the engine needs nothing of VGGT or the merger;
    - sampling from the distribution the loss scores: temperature T, top-p 1, top-k off, the
      suppressed tokens (config "suppress_token_ids") never drawn. Old and reference log-probs stay
      rft3d's own forward passes over the sampled tokens, so the objective is unchanged;
    - the LLM weights (LoRA merged) are pushed into the engine before every rollout, so the engine
      always samples from the weights of the last optimiser step.

Contents: 1. sampler() (handed to grpo.grpo_step by train.py), close(); 2. the engine: start,
requests, weight push; 3. the environment check and its message.

Who calls it: train.py --rollout vllm (grpo.GRPOConfig.sampler), tests, bench.py. It imports
nothing of rft3d: it drives the policy through model.qwen, model.image_embeds and model.config.
vLLM lives in its own virtual environment (it pins torch and transformers): README.md says how.
"""
import copy
import json
import logging
import os
import random
import tempfile
import weakref

import numpy as np
import torch

INSTALL = ("--rollout vllm needs vLLM, which pins its own torch and transformers, so it goes in a "
           "virtual environment of its own: python3 -m venv .venv-vllm && . .venv-vllm/bin/activate"
           " && pip install torch==2.13.0 && pip install -e \".[vllm,test]\" (README.md, 'When one "
           "machine is not enough', has the rest, CPU-only torchvision included)")
KV_CACHE_BYTES_CPU = 2 ** 30  # vLLM on a CPU otherwise reserves most of the RAM for its KV cache
GPU_MEMORY_SHARE = 0.3  # colocated on a GPU: the rest stays with the policy, reference, AdamW
_ENGINES = weakref.WeakKeyDictionary()  # policy (unwrapped VGLLM) -> its Engine

# --------------------------------------------------------------------------------------------------
# 1. The hook: sampler() gives grpo_step a function with VGLLM.generate's signature


def sampler(model, tokenizer, seed=0, bf16=False):
    """-> generate(batch, encodings, max_new_tokens, temperature, do_sample, synced_gpus=False,
    return_logprobs=False) on this rank's engine for `model`, started at the first call (seed: the
    rank's, train.py passes --seed + rank; dtype: bf16 under --bf16, else the policy's). train.py
    hands it to grpo.grpo_step through GRPOConfig.sampler."""

    def generate(batch, encodings, max_new_tokens, temperature=1.0, do_sample=True,
                 synced_gpus=False, return_logprobs=False):
        if model not in _ENGINES:
            dtype = torch.bfloat16 if bf16 else model.qwen.lm_head.weight.dtype
            _ENGINES[model] = Engine(model, tokenizer, seed=seed, dtype=dtype)
        engine = _ENGINES[model]
        engine.push_weights()  # the optimiser stepped since the last rollout
        return engine.generate(batch, encodings, max_new_tokens, temperature, do_sample,
                               return_logprobs)
    return generate


def close():
    """Shut this process's engines down. train.py calls it before it ends its process group: an
    engine's shutdown tears down the process groups vLLM made inside it, and would fail (a traceback
    at exit) if that group were already gone."""
    for engine in list(_ENGINES.values()):
        engine.llm.llm_engine.engine_core.shutdown()
    _ENGINES.clear()


# --------------------------------------------------------------------------------------------------
# 2. The engine


class Engine:
    """One vLLM engine (vllm.LLM) for one policy, in this process. Start: 7-8 s for the tiny default
    on a CPU, importing vLLM included (bench.py vllm)."""

    def __init__(self, model, tokenizer, seed=0, dtype=None, max_model_len=None,
                 max_images=64):
        # In this process, not vLLM's engine-core subprocess: the weight push hands tensors over by
        # reference, and under torchrun each rank keeps its own engine.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM logs INFO lines on every push (prefix-cache resets) that would flood train.py's
        # output; VLLM_LOGGING_LEVEL=INFO brings them back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        vllm = import_vllm()
        self.model, self.vllm = model, vllm
        q = model.config["qwen"]
        self.image_token_id = q["image_token_id"]
        self.eos, self.pad = model.config["eos_token_id"], model.config["pad_token_id"]
        suppressed = set(model.config["suppress_token_ids"])
        # vLLM masks everything outside allowed_token_ids to -inf before temperature and sampling:
        # the same distribution as model.policy_logits' fill (exp(-1e9) is 0 in float32 too).
        self.allowed = [i for i in range(q["text_config"]["vocab_size"]) if i not in suppressed]
        self.dir = tempfile.TemporaryDirectory(prefix="rft3d-vllm-")
        write_model_dir(model, tokenizer, self.dir.name)
        on_cpu = model.device.type == "cpu"
        memory = (dict(kv_cache_memory_bytes=KV_CACHE_BYTES_CPU) if on_cpu
                  else dict(gpu_memory_utilization=GPU_MEMORY_SHARE))
        # An engine in this process seeds the global random generators at its start; put back the
        # training's own (train.py seeds each rank and --resume restores them). Sampling then draws
        # from the global torch generator, as the own loop does.
        rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.llm = vllm.LLM(
            model=self.dir.name, load_format="dummy",  # the real weights: push_weights below
            dtype=dtype or model.qwen.lm_head.weight.dtype, seed=seed,
            max_model_len=max_model_len or min(q["text_config"]["max_position_embeddings"], 32768),
            enable_mm_embeds=True, limit_mm_per_prompt={"image": max_images},
            logprobs_mode="processed_logprobs",  # log-probs of the tempered, masked distribution
            generation_config="vllm",  # ignore a checkpoint's sampling defaults (top_k, penalties)
            enforce_eager=on_cpu,  # no compilation on a CPU: a minute per start for little gain
            **memory)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        # Two warnings on every rollout, silenced: a push leaves the vision tower's dummy weights as
        # they are, by design (never run: the engine gets embeddings), and vLLM's CPU worker refuses
        # each torch.set_num_threads its own steps call. Set after the engine starts: its start
        # reconfigures vLLM's loggers.
        for name in ("model_executor.model_loader.reload.layerwise",
                     "model_executor.model_loader.reload.inplace", "v1.worker.cpu_worker"):
            logging.getLogger(f"vllm.{name}").setLevel(logging.ERROR)
        self.push_weights()

    def push_weights(self):
        """The policy's LLM weights into the engine (the vision tower and the merger never: the
        engine takes their output as embeddings). Called before every rollout: a copy of the LLM's
        weights, 0.02 s for the tiny default on a CPU."""
        weights = llm_weights(self.model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # Keys and values cached under the old weights must not be reused: the same prompt with the
        # same embeddings hashes the same (prefix cache), and so do the cached embeddings.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True,
                 return_logprobs=False):
        """VGLLM.generate's contract: completion ids [B, C] on the policy's device, new tokens only,
        pad after the first EOS, C where the last row ended; with return_logprobs also the engine's
        own log-prob of each sampled token [B, C] (0 at padding). Rows that repeat one prompt (the
        G of a group) go to the engine as one request with n = G: one prefill, G samples."""
        requests, rows_of = self.requests(batch, encodings)
        params = [self.vllm.SamplingParams(
            n=len(rows) if do_sample else 1,  # vLLM refuses n > 1 for greedy: copied below
            temperature=temperature if do_sample else 0.0, top_p=1.0, top_k=0,
            min_p=0.0, max_tokens=max_new_tokens, stop_token_ids=[self.eos],
            allowed_token_ids=self.allowed, detokenize=False,
            logprobs=0 if return_logprobs else None) for rows in rows_of]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        B = batch["input_ids"].shape[0]
        tokens, logps = [None] * B, [None] * B
        for out, rows in zip(outs, rows_of):
            for b, sample in zip(rows, out.outputs if do_sample else out.outputs * len(rows)):
                tokens[b] = list(sample.token_ids)
                if return_logprobs:  # logprobs=0: only the sampled token's entry
                    logps[b] = [next(iter(d.values())).logprob for d in sample.logprobs]
        C = max(map(len, tokens))
        completion = torch.full((B, C), self.pad, dtype=torch.long)
        logp = torch.zeros(B, C)
        for b, row in enumerate(tokens):
            completion[b, :len(row)] = torch.tensor(row, dtype=torch.long)
            if return_logprobs:
                logp[b, :len(row)] = torch.tensor(logps[b])
        completion, logp = completion.to(self.model.device), logp.to(self.model.device)
        return (completion, logp) if return_logprobs else completion

    def requests(self, batch, encodings):
        """One vLLM request per distinct prompt row (its encoding and token ids), in first-seen
        order, and the batch rows each one serves."""
        embeds = self.model.image_embeds(encodings)  # per frame [T_i, d], in batch-row order
        first_frame, k = [], 0
        for enc in encodings:
            first_frame.append(k)
            k += len(enc.n_tokens_per_image)
        requests, rows_of, seen = [], [], {}
        for b, enc in enumerate(encodings):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()  # no padding
            key = (id(enc), tuple(ids))
            if key in seen:
                rows_of[seen[key]].append(b)
                continue
            seen[key] = len(requests)
            rows_of.append([b])
            n = len(enc.n_tokens_per_image)
            image = torch.cat(embeds[first_frame[b]:first_frame[b] + n]).detach()
            requests.append({"prompt_token_ids": collapse_image_pads(ids, self.image_token_id),
                             "multi_modal_data": {"image": {
                                 # vLLM hashes and batches multimodal inputs on the host
                                 "image_embeds": image.cpu(),
                                 "image_grid_thw": enc.image_grid_thw.cpu()}}})
        return requests, rows_of


def collapse_image_pads(ids, image_token_id):
    """rft3d's prompt rows carry T_i <|image_pad|> per frame; vLLM wants one per frame and expands
    it itself from image_grid_thw (handed the expanded row, it would expand every run again)."""
    return [t for k, t in enumerate(ids)
            if not (t == image_token_id and k > 0 and ids[k - 1] == image_token_id)]


def llm_weights(model):
    """[(name, tensor)] of the LLM (decoder layers, final norm, embeddings, head) under the names
    of transformers' Qwen2.5-VL checkpoints, which vLLM's loader maps; LoRA adapters (lora.py)
    merged into their base weight, the weight the policy computes with."""
    out, lora = [], set()
    for name, module in model.qwen.named_modules():
        if not name.startswith(("model.language_model", "lm_head")):
            continue
        if any(name.startswith(f"{p}.") for p in lora):  # the base linear inside a LoRA wrapper
            continue
        if hasattr(module, "merged_weight"):  # lora.LoRALinear
            lora.add(name)
            out.append((f"{name}.weight", module.merged_weight().detach()))
            if module.base.bias is not None:
                out.append((f"{name}.bias", module.base.bias.detach()))
            continue
        out += [(f"{name}.{k}", v.detach()) for k, v in module.named_parameters(recurse=False)]
    return out


def write_model_dir(model, tokenizer, out_dir):
    """What vLLM reads to build the engine, no weights: transformers' Qwen2.5-VL config.json, the
    tokenizer (vLLM's Qwen2.5-VL input processor needs one) and an image-processor config whose
    patch and merge sizes match the model's (vLLM sizes its dummy images by it)."""
    config = copy.deepcopy(model.qwen.config)
    config.architectures = [type(model.qwen).__name__]  # how vLLM picks its model class
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    vc = model.config["qwen"]["vision_config"]
    side = vc["patch_size"] * vc["spatial_merge_size"]  # one merged token
    width = model.config["image_width"]
    processor = {"image_processor_type": "Qwen2VLImageProcessor",
                 "processor_class": "Qwen2_5_VLProcessor", "patch_size": vc["patch_size"],
                 "merge_size": vc["spatial_merge_size"],
                 "temporal_patch_size": vc["temporal_patch_size"], "min_pixels": side * side,
                 "max_pixels": width * width,
                 "size": {"shortest_edge": side * side, "longest_edge": width * width}}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=1)


# --------------------------------------------------------------------------------------------------
# 3. The environment


def import_vllm():
    """vllm, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL) from e
    return vllm
