"""lora.py: adapters start as an exact no-op, train, and merge on save."""
import torch

import checkpoints as C
import lora
from test_model import full_batch, make_model


def test_lora_starts_as_exact_noop_and_trains(tok, cfg, frames, tmp_path):
    model = make_model(cfg)
    enc = model.encode(frames)
    _, inputs = full_batch(model, tok, enc)
    before = model(*inputs, enc).detach()
    # targets that can be sampled
    text = ~torch.isin(inputs[0][:, 1:], torch.tensor(cfg["suppress_token_ids"]))
    base = {k: v.clone() for k, v in model.qwen.state_dict().items()}
    lora.apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(*inputs, enc).detach(), before)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("merger.") for n in names)
    assert len([n for n in names if n.endswith("lora_B")]) == 4 * 7
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (-model(*inputs, enc)[text].mean()).backward()
        opt.step()
    after = model(*inputs, enc).detach()
    assert after[text].mean() > before[text].mean() + 1e-3
    lora_sd = model.qwen.state_dict()
    assert all(torch.equal(lora_sd[k.replace("_proj.", "_proj.base.")]
                           if k.replace("_proj.", "_proj.base.") in lora_sd
                           else lora_sd[k], v) for k, v in base.items())  # base weights untouched
    C.save_pretrained(model, tok, tmp_path / "a")  # merged on save, model unchanged
    # a gathered (FSDP) state dict
    C.save_pretrained(model, tok, tmp_path / "b", state_dict=model.state_dict())
    for d in ("a", "b"):
        loaded, _ = C.load_pretrained(tmp_path / d)
        assert torch.allclose(loaded(*inputs, enc), after, atol=1e-5)
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert torch.allclose(model(*inputs, enc), after, atol=1e-5)
