"""lora.py: LoRA adapters on the LLM's linear layers, an option of train.py (--lora-rank; 3D-RFT
used LoRA for spatial reasoning). Not needed to understand 3D-RFT.

Contents: LoRALinear (one wrapped linear), apply_lora (wrap the decoder layers' linears),
merge_lora (fold the adapters back into plain linears).

Who calls it: train.py (apply_lora), checkpoints.py (saves merge the adapters into the weights).
It imports nothing of rft3d: it walks model.qwen's decoder layers.
"""
import math

import torch
import torch.nn as nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T; B = 0 at first (an exact no-op), base frozen."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self):
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def apply_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Freeze the whole LLM, LoRA-wrap its target linears; the geometry merger stays trainable."""
    model.qwen.requires_grad_(False)
    for layer in model.qwen.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Fold every LoRA update into its base linear in place (the LLM stays frozen) -> the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(module, name, child.base)
    return model
