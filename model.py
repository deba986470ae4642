"""model.py: VG-LLM (Qwen2.5-VL + VGGT-1B geometry features), from scratch around transformers.
DESIGN.md section 5:
    frames uint8 [S,H,W,3] --preprocess--> Qwen patches + VGGT pixels
      --encode (frozen, once per sample)--> Encoding (vision embeds, VGGT layer -2 patch tokens)
      --image_embeds (trainable merger, THE fusion point)--> [T_i, d] = vision + merger(geometry)
      --forward / generate--> the <|image_pad|> positions, via transformers' mm_encoder_outputs
Sections: 1. configs  2. tiny tokenizer  3. frame preprocessing  4. geometry merger
    5. VGLLM: encode, fusion, prompts, forward, generate (the decode loop: decoding.py)
    6. the policy's distribution: suppressed tokens, chunked log-probs (LoRA option: lora.py)
Beside it: vggt.py (the geometry encoder), checkpoints.py (weights in and out)."""
import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerFast
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

import decoding  # the fast decode loop behind VGLLM.generate (machinery)
from vggt import VGGT_1B, VGGTAggregator  # the geometry encoder (vggt.py)

# transformers 5.17 has no `mm_encoder_outputs` and silently drops unknown forward kwargs (the fused
# image embeddings would be ignored, no error); 5.18 is the first release with it (checked both).
if "mm_encoder_outputs" not in inspect.signature(Qwen2_5_VLModel.forward).parameters:
    import transformers
    raise ImportError("model.py needs transformers >= 5.18 (Qwen2.5-VL's mm_encoder_outputs), "
                      f"found {transformers.__version__}")

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's and VG-LLM's default system turn
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL image normalisation (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPRESSED_LOGIT = -1e9  # never-sampled tokens' logit (VGLLM.suppressed_ids): probability exactly 0

# --------------------------------------------------------------------------------------------------
# 1. Configs, JSON-able: {"qwen": Qwen2_5_VLConfig.to_dict(), "vggt": hyperparameters or None, ...}
# --------------------------------------------------------------------------------------------------

# The special tokens in Qwen's order: ids 0..13 in the tiny tokenizer (real Qwen: 151643..151656).
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                       "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                       "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                       "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL_ID = 151643  # real Qwen2.5's <|endoftext|>; the specials are contiguous after it


def _token_fields(first_special_id, suppress_end):
    """Token ids, Qwen's specials contiguous from first_special_id; suppressed: all ids in
    [first_special_id, suppress_end) but EOS (real vocabulary: also unused rows 151665..151935)."""
    ids = {tok: first_special_id + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    eos = ids["<|im_end|>"]
    return dict(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                suppress_token_ids=[i for i in range(first_special_id, suppress_end) if i != eos],
                qwen_ids=dict(image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"]))


def _make_config(text, vision, tokens, vggt, merger_hidden, image_width, tie=False):
    text = dict(text, bos_token_id=tokens["pad_token_id"], eos_token_id=tokens["eos_token_id"])
    qwen = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                            **tokens["qwen_ids"])
    return {"qwen": qwen.to_dict(), "vggt": vggt, "merger_hidden": merger_hidden if vggt else None,
            "image_width": image_width, "reference_frame": "first",
            "eos_token_id": tokens["eos_token_id"], "pad_token_id": tokens["pad_token_id"],
            "suppress_token_ids": tokens["suppress_token_ids"]}


def tiny_config(vocab_size, vggt=True, patch_size=7, image_size=56):
    """DESIGN.md section 8's toy size, 7 px patches (why: section 5): 56 px frames (image_size) are
    8 x 8 patches, 16 tokens."""
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
                  window_size=112, fullatt_block_indexes=[1], tokens_per_second=2,
                  patch_size=patch_size)
    tiny_vggt = dict(img_size=56, patch_size=patch_size, embed_dim=64, depth=2, num_heads=4,
                     mlp_ratio=4.0, num_register_tokens=4, patch_embed_depth=2, patch_embed_heads=4)
    return _make_config(text, vision, _token_fields(0, len(TINY_SPECIAL_TOKENS)),
                        tiny_vggt if vggt else None, merger_hidden=128, image_width=image_size)


def real_config(name, vggt=True):
    """Qwen2.5-VL-3B/7B-Instruct (config.json) + VGGT-1B, VG-LLM's merger (hidden 4096), 518 px."""
    sizes = {"qwen2.5-vl-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                   tie=True),
             "qwen2.5-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                   tie=False)}
    if name not in sizes:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(sizes)}")
    text = dict(sizes[name])
    tie = text.pop("tie")
    text.update(max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=text["hidden_size"], window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    return _make_config(text, vision, _token_fields(QWEN_FIRST_SPECIAL_ID, text["vocab_size"]),
                        dict(VGGT_1B) if vggt else None, merger_hidden=4096, image_width=518,
                        tie=tie)


def check_tokenizer(config, tokenizer):
    """The config's token ids must be the tokenizer's, or image tokens land in the wrong places."""
    q = config["qwen"]
    want = {"<|image_pad|>": q["image_token_id"], "<|video_pad|>": q["video_token_id"],
            "<|vision_start|>": q["vision_start_token_id"],
            "<|vision_end|>": q["vision_end_token_id"], "<|im_end|>": config["eos_token_id"],
            "<|endoftext|>": config["pad_token_id"]}
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in want}
    if got != want or tokenizer.pad_token_id != config["pad_token_id"]:
        raise ValueError("tokenizer and model config disagree on special token ids: "
                         f"config {want}, tokenizer {got} (pad_token_id {tokenizer.pad_token_id})")
    if len(tokenizer) > q["text_config"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{q['text_config']['vocab_size']}")

# --------------------------------------------------------------------------------------------------
# 2. Tiny tokenizer: byte-level BPE trained offline on the task corpus, Qwen's specials and template
# --------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' "
                 "+ message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_tiny_tokenizer(corpus, vocab_size=1024):
    """Byte-level BPE, every digit, '-', '.', bracket and brace split off first (numbers digit by
    digit). Special ids 0..13 in Qwen's order; pad (<|endoftext|>) != eos (<|im_end|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9\-.\[\]{}]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=TINY_SPECIAL_TOKENS,
                                   padding_side="left", chat_template=CHAT_TEMPLATE)

# --------------------------------------------------------------------------------------------------
# 3. Frame preprocessing (VG-LLM's, in numpy/torch: transformers' Qwen processors need torchvision)
# --------------------------------------------------------------------------------------------------


def preprocess(frames, config):
    """frames uint8 [S,H,W,3] -> Qwen patches + VGGT pixels, as VG-LLM (DESIGN.md section 5)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [S,H,W,3], got {frames.dtype} {frames.shape}")
    vc = config["qwen"]["vision_config"]
    p, m, tp = vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
    S, H, W, _ = frames.shape
    width = config["image_width"]
    height = round(H * (width / W) / p) * p
    if (height, width) != (H, W):
        resize = lambda f: np.asarray(Image.fromarray(f).resize((width, height),
                                                                Image.Resampling.BICUBIC))
        frames = np.stack([resize(f) for f in frames])
    if height > width:  # VG-LLM's "crop" mode: portrait frames are centre-cropped to width x width
        top = (height - width) // 2
        frames, height = frames[:, top:top + width], width
    vggt_images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    gh, gw = (height // p) // m * m, (width // p) // m * m  # even patch grid
    x = vggt_images[:, :, :gh * p, :gw * p]
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    # [S,3,gh/m,m,p,gw/m,m,p] -> [S,gh/m,gw/m,m,m,3,p,p]: raster over 2x2 blocks, inner (dy, dx)
    x = x.reshape(S, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1)  # the frame twice: [..,3,tp,p,p]
    pixel_values = x.reshape(S * gh * gw, 3 * tp * p * p)
    image_grid_thw = torch.tensor([[1, gh, gw]] * S, dtype=torch.long)
    # -> pixel_values [S*gh*gw, 3*tp*p*p], image_grid_thw [S, 3], vggt_images [S, 3, H', W']
    return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
            "vggt_images": vggt_images}

# --------------------------------------------------------------------------------------------------
# 4. Geometry merger (VG-LLM's `merger.*`): RMSNorm -> 2x2 grouping as Qwen's patch merger -> MLP
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x32 * rms).to(x.dtype)


def group_2x2(x, h, w, m=2):
    """[S, h*w, C] raster-ordered patch features -> [S*(h//m)*(w//m), m*m*C]: odd grids cropped to
    even; merged tokens in raster order, each its m x m patches concatenated in (dy, dx) order."""
    S, _, C = x.shape
    hm, wm = h // m, w // m
    x = x.view(S, h, w, C)[:, :hm * m, :wm * m]
    return x.reshape(S, hm, m, wm, m, C).permute(0, 1, 3, 2, 4, 5).reshape(S * hm * wm, m * m * C)


class GeometryMerger(nn.Module):
    def __init__(self, in_dim, hidden, out_dim, merge=2):
        super().__init__()
        self.merge = merge
        self.ln_q = RMSNorm(in_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merge * merge * in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))
        for layer in (self.mlp[0], self.mlp[2]):  # transformers' Qwen init (initializer_range 0.02)
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x, h, w):  # x [S, h*w, 2C] -> [S * (h//2) * (w//2), d_model]
        return self.mlp(group_2x2(self.ln_q(x), h, w, self.merge))

# --------------------------------------------------------------------------------------------------
# 5. VGLLM
# --------------------------------------------------------------------------------------------------


@dataclass
class Encoding:
    """One sample's frozen encoder outputs, reused for G samples, reference and policy passes."""
    image_embeds: tuple  # per frame [T_i, d]: Qwen vision tower (+ its frozen 2x2 merger)
    geometry: torch.Tensor | None  # [S, h*w, 2C]: VGGT layer -2 patch tokens; None: no geometry
    geometry_hw: tuple | None  # VGGT patch grid (h, w)
    image_grid_thw: torch.Tensor  # [S, 3] long: Qwen patch grid per frame (1, gh, gw)
    n_tokens_per_image: list  # T_i = gh * gw / 4


class VGLLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config["qwen"]))
        if self.tied:  # 3B shares input and output embeddings (not tied by transformers on meta)
            self.qwen.lm_head.weight = self.qwen.model.language_model.embed_tokens.weight
        self.vggt = self.merger = None
        if config.get("vggt"):
            self.vggt = VGGTAggregator(**config["vggt"])
            d_model = config["qwen"]["text_config"]["hidden_size"]
            self.merger = GeometryMerger(self.vggt.out_dim, config["merger_hidden"], d_model,
                                         config["qwen"]["vision_config"]["spatial_merge_size"])
            self.vggt.requires_grad_(False)
        self.qwen.model.visual.requires_grad_(False)  # frozen: Qwen's vision tower + merger, VGGT
        self.train()

    def train(self, mode=True):  # frozen encoders stay in eval mode
        super().train(mode)
        self.qwen.model.visual.eval()
        if self.vggt is not None:
            self.vggt.eval()
        return self

    @property
    def tied(self):  # one matrix for the input embedding and the output head (Qwen2.5-VL-3B)
        return bool(self.config["qwen"].get("tie_word_embeddings", False))

    @property
    def device(self):
        return self.qwen.lm_head.weight.device

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self):
        self.qwen.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    # 5a. frozen encoders, once per sample ---------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames):
        """frames: list (per sample) of uint8 [S,H,W,3] -> list of Encoding (DESIGN.md 5)."""
        visual = self.qwen.model.visual
        inputs = [preprocess(f, self.config) for f in frames]
        pixels = torch.cat([x["pixel_values"] for x in inputs]).to(self.device, visual.dtype)
        grids = torch.cat([x["image_grid_thw"] for x in inputs]).to(self.device)
        vision = self.qwen.model.get_image_features(pixels, grids).pooler_output  # ([T_i, d], ...)
        merge = self.config["qwen"]["vision_config"]["spatial_merge_size"]
        encodings, i = [], 0
        for x in inputs:
            grid = x["image_grid_thw"].to(self.device)
            S = len(grid)
            geometry = hw = None
            if self.vggt is not None:
                images = x["vggt_images"].to(self.device)  # [S, 3, H', W']
                flip = self.config.get("reference_frame", "first") == "last"
                geometry, hw = self.vggt.features(images.flip(0) if flip else images)
                geometry = geometry.flip(0) if flip else geometry  # [S, h*w, 2C]; hw = (h, w)
            n_tokens = (grid.prod(-1) // merge ** 2).tolist()
            encodings.append(Encoding(tuple(vision[i:i + S]), geometry, hw, grid, n_tokens))
            i += S
        return encodings

    # 5b. THE fusion point -------------------------------------------------------------------------

    def image_embeds(self, encodings):
        """Per-image embeds = vision + merger(geometry), batch-row order; repeats merged once."""
        fused, out = {}, []
        dtype = self.qwen.lm_head.weight.dtype
        for enc in encodings:
            if id(enc) not in fused:
                embeds = tuple(e.to(dtype) for e in enc.image_embeds)
                if self.merger is not None and enc.geometry is not None:
                    geometry = self.merger(enc.geometry.to(self.merger.ln_q.weight.dtype),
                                           *enc.geometry_hw)
                    embeds = tuple(e + g.to(dtype)
                                   for e, g in zip(embeds, geometry.split(enc.n_tokens_per_image)))
                fused[id(enc)] = embeds
            out.extend(fused[id(enc)])
        return tuple(out)

    def mm_inputs(self, image_grid_thw, encodings):
        """Kwargs of transformers' seam: precomputed per-image embeddings, not pixel_values."""
        if not encodings:
            return {}
        if image_grid_thw is None:
            image_grid_thw = torch.cat([e.image_grid_thw for e in encodings])
        embeds = BaseModelOutputWithPooling(pooler_output=self.image_embeds(encodings))
        return {"image_grid_thw": image_grid_thw.to(self.device),
                "mm_encoder_outputs": {"image": embeds}}

    # 5c. prompts ----------------------------------------------------------------------------------

    def prompt_batch(self, tokenizer, prompts, encodings):
        """Chat-templated, left-padded, "<image>" -> vision_start + image_pad x T_i + vision_end.
        tokenizer: the model's (checkpoints.py checks their token ids agree when it loads them)."""
        q, rows = self.config["qwen"], []
        tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        for b, (text, enc) in enumerate(zip(prompts, encodings, strict=True)):
            chat = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                                  {"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
            first, *pieces = chat.split(IMAGE_PLACEHOLDER)
            if len(pieces) != len(enc.n_tokens_per_image):
                raise ValueError(f"prompt {b} has {len(pieces)} {IMAGE_PLACEHOLDER} placeholders "
                                 f"but its sample has {len(enc.n_tokens_per_image)} frames")
            ids = tokens(first)
            for T, piece in zip(enc.n_tokens_per_image, pieces):  # frame i's vision block, text
                ids += [q["vision_start_token_id"], *[q["image_token_id"]] * T,
                        q["vision_end_token_id"], *tokens(piece)]
            rows.append(ids)
        left_pad = lambda seqs, value: torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(x, dtype=torch.long) for x in seqs], batch_first=True,
            padding_value=value, padding_side="left")  # [B, P], on the CPU, never truncated
        input_ids = left_pad(rows, self.config["pad_token_id"])
        return {"input_ids": input_ids, "attention_mask": left_pad([[1] * len(r) for r in rows], 0),
                "mm_token_type_ids": (input_ids == q["image_token_id"]).long(),  # 1: image token
                "image_grid_thw": (torch.cat([e.image_grid_thw.cpu() for e in encodings])
                                   if encodings else None)}  # [N_images, 3]

    # 5d. per-token log-probs (one call of the root module: FSDP2 wraps the root) ------------------

    def forward(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, encodings,
                temperature=1.0, return_entropy=False, chunk_size=512, first_position=0):
        """logp [B, L-1]: logp[b,t] = log softmax(logits[b,t] / temperature)[input_ids[b,t+1]]."""
        out = self.qwen.model(input_ids=input_ids, attention_mask=attention_mask,
                              mm_token_type_ids=mm_token_type_ids, use_cache=False,
                              **self.mm_inputs(image_grid_thw, encodings))
        hidden = out.last_hidden_state[:, first_position:-1]  # positions that predict a token
        # Score the distribution generate() samples: the same temperature and suppressed tokens.
        logp, entropy = token_logprobs(hidden, self.qwen.lm_head, input_ids[:, first_position + 1:],
                                       temperature, chunk_size, return_entropy,
                                       self.suppressed_ids(hidden.device))
        if first_position > 0:
            logp = F.pad(logp, (first_position, 0))
            entropy = F.pad(entropy, (first_position, 0)) if return_entropy else None
        return (logp, entropy) if return_entropy else logp

    # 5e. the policy's distribution and sampling from it -------------------------------------------

    def suppressed_ids(self, device=None):
        """[n] long: never-sampled ids (specials but EOS, unused vocab rows) for policy_logits."""
        return torch.tensor(self.config["suppress_token_ids"], dtype=torch.long, device=device)

    def policy_logits(self, hidden, temperature=1.0, suppress=None):
        """[N, d] -> [N, V] float32: policy_logits with this head; what decoding.py samples."""
        return policy_logits(hidden, self.qwen.lm_head, temperature, suppress)

    @torch.no_grad()
    def generate(self, batch, encodings, max_new_tokens, temperature=1.0, do_sample=True,
                 synced_gpus=False, return_logprobs=False):
        """Completion ids [B, C] sampled from policy_logits; the loop: decoding.py (DESIGN.md 6)."""
        return decoding.generate(self, batch, encodings, max_new_tokens, temperature, do_sample,
                                 synced_gpus, return_logprobs)

# --------------------------------------------------------------------------------------------------
# 6. The policy's distribution (what decoding.py samples): tempered logits without the suppressed
#    tokens; chunked per-token log-probs ([B, L, V] logits, V = 151k, never all at once, fwd or bwd)
# --------------------------------------------------------------------------------------------------


def policy_logits(hidden, lm_head, temperature, suppress):
    """hidden [N, d] -> [N, V] float32: logits / T, SUPPRESSED_LOGIT at suppress (DESIGN.md 6)."""
    z = lm_head(hidden).float().div_(temperature)
    return z if suppress is None else z.index_fill_(1, suppress, SUPPRESSED_LOGIT)


def token_logprobs(hidden, lm_head, targets, temperature=1.0, chunk_size=512, return_entropy=False,
                   suppress=None):
    """[B, L, d], targets [B, L] -> (logp, entropy or None) [B, L] of softmax(policy_logits)."""
    B, L, d = hidden.shape
    h, y = hidden.reshape(B * L, d), targets.reshape(B * L)

    def chunk(h_c, y_c):
        z = policy_logits(h_c, lm_head, temperature, suppress)  # [n, V] float32
        lse = torch.logsumexp(z, dim=-1)
        logp = z.gather(-1, y_c[:, None])[:, 0] - lse
        if not return_entropy:
            return logp, None
        with torch.no_grad():
            entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        return logp, entropy

    # chunk_size tokens at a time, each checkpointed (backward recomputes its logits): DESIGN.md 6
    grad = torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad)
    run = (lambda *a: checkpoint(chunk, *a, use_reentrant=False)) if grad else chunk
    parts = [run(h[s:s + chunk_size], y[s:s + chunk_size]) for s in range(0, B * L, chunk_size)]
    if not parts:  # no tokens
        logp = hidden.new_zeros(B, L, dtype=torch.float32)
        return logp, torch.zeros_like(logp) if return_entropy else None
    logp = torch.cat([lp for lp, _ in parts]).view(B, L)
    entropy = torch.cat([e for _, e in parts]).view(B, L) if return_entropy else None
    return logp, entropy
