"""bench/graphed_step.py: a CUDA-graph replay of forward + backward gives the eager step's losses and weights."""

from __future__ import annotations

import pytest
import torch

from slimtune.bench.graphed_step import GraphedBackward


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GraphedBackward(lambda: torch.zeros(()), [])


def _train(graph: bool, quantized: bool, steps: int = 5) -> tuple[list[float], list[torch.Tensor], str | None]:
    from slimtune import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from slimtune.bench.models import PROJECTIONS, build_llama, slimtune_quantizer
    from slimtune.bench.training import slimtune_loss

    model = build_llama("tiny", "cuda", torch.bfloat16, slimtune_quantizer if quantized else None, seed=0)
    prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS)))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B: every adapter weight gets a gradient from step 1
            torch.nn.init.normal_(p, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2)).cuda()
    step = GraphedBackward(lambda: slimtune_loss(model, ids), params, warmup=2, model=model) if graph else None
    masks = []  # what the attention layers get while the graph is captured: None = SDPA's causal kernel
    model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(
        lambda _m, args, kwargs: masks.append(kwargs.get("attention_mask", args[2] if len(args) > 2 else None))
        if torch.cuda.is_current_stream_capturing() else None, with_kwargs=True)
    losses = []
    for _ in range(steps):
        if step is None:
            loss = slimtune_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            loss = step()
            opt.step()
            step.zero_grad(opt)
        losses.append(loss.item())
    captured = None if step is None else (step.reason or ("captured" if step.captured else "eager"))
    if step is not None:
        assert masks and all(m is None for m in masks), \
            "the capture built a dense attention mask (Note: transformers' masks under capture)"
    return losses, [p.detach().clone() for p in params], captured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantized", [False, True])
def test_graph_replay_matches_eager(quantized):
    eager_losses, eager_params, _ = _train(False, quantized)
    graph_losses, graph_params, captured = _train(True, quantized)
    assert captured == "captured"
    assert graph_losses[0] == eager_losses[0]  # warmup calls are eager
    assert graph_losses == pytest.approx(eager_losses, rel=2e-3)
    assert eager_losses[-1] < eager_losses[0]  # it trains
    for g, e in zip(graph_params, eager_params, strict=True):
        assert ((g.float() - e.float()).norm() / e.float().norm()) < 1e-2


def test_capture_replays_the_eager_mask_decision(monkeypatch):
    """Note: transformers' masks under capture: an attention module that got no mask in the eager calls gets
    none during the capture either; one that got a mask keeps it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class SelfAttention(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            self.seen = attention_mask
            return x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = SelfAttention(), SelfAttention()

    model = Model()
    step = GraphedBackward(lambda: torch.zeros(()), [], model=model)
    dense = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    model.b(torch.zeros(2), attention_mask=None)  # not one of the step's calls: not recorded
    step.masks.active = True
    model.a(torch.zeros(2), attention_mask=None)  # eager: transformers chose the causal kernel
    model.b(torch.zeros(2), attention_mask=dense)  # eager: a real mask
    capturing["on"] = True
    model.a(torch.zeros(2), attention_mask=dense)
    model.b(torch.zeros(2), attention_mask=dense)
    assert model.a.seen is None and model.b.seen is dense
    assert step.masks.eager_none_mask == {model.a: True, model.b: False}
    step.masks.active = False  # another capture (say, decoding) is left alone
    model.a(torch.zeros(2), attention_mask=dense)
    assert model.a.seen is dense
    step.remove_hooks()
    step.masks.active, capturing["on"] = True, True
    model.a(torch.zeros(2), attention_mask=dense)
    assert model.a.seen is dense
