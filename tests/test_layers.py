"""The fused MultiLoRA layer against an independent per-module loop, PEFT LoRA and the spec."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from multilora import MultiLoRAError, MultiLoRALinear


def loop_reference(x, W, b, A, B, s, alpha, r):
    """docs/method.md §2 written the slow, obvious way: y = W x + b + alpha/r * sum_i s_i * B_i A_i x."""
    y = x @ W.T + b
    for i in range(A.shape[0]):
        si = torch.ones(B.shape[1]) if s is None else (s[i] if s.dim() == 2 else s[i].expand(B.shape[1]))
        y = y + (alpha / r) * si * ((x @ A[i].T) @ B[i].T)
    return y


def make_layer(kind="linear", d_in=20, d_out=12, **kw):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    if kind == "conv1d":
        nn.init.normal_(base.weight), nn.init.normal_(base.bias)
    return MultiLoRALinear(base, **kw)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("scale", ["vector", "scalar"])
def test_fused_forward_and_grads_equal_per_module_loop(kind, scale):
    layer = make_layer(kind, n=3, r=4, alpha=8.0, scale=scale)
    with torch.no_grad():  # random non-zero scales, as after training
        layer.lora_s.copy_(torch.randn(layer.lora_s.shape))
    x = torch.randn(5, 7, 20, requires_grad=True)
    y = layer(x)

    W = layer.base.weight.T if kind == "conv1d" else layer.base.weight  # (d_out, d_in)
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    s = layer.lora_s.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref = loop_reference(x2, W.detach(), layer.base.bias.detach(), A, B, s, 8.0, 4)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for ours, ref in [(layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (layer.lora_s.grad, s.grad),
                      (x.grad, x2.grad)]:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_shapes():
    layer = make_layer(n=3, r=4, scale="vector")
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters() if k.startswith("lora_")}
    assert shapes == {"lora_A": (3, 4, 20), "lora_B": (3, 12, 4), "lora_s": (3, 12)}
    assert tuple(make_layer(n=3, r=4, scale="scalar").lora_s.shape) == (3,)
    lora = make_layer(n=1, r=4, init="lora", scale="none")
    assert lora.lora_s is None and "lora_s" not in dict(lora.named_parameters())
    # trainable parameters per layer: n r (d_in + d_out) + n d_out  (docs/method.md §2)
    n_params = sum(p.numel() for k, p in layer.named_parameters() if k.startswith("lora_"))
    assert n_params == 3 * 4 * (20 + 12) + 3 * 12


def test_multilora_init_zero_update_and_only_s_gets_gradient_at_step0():
    layer = make_layer(n=3, r=4, init="multilora")
    base = nn.Linear(20, 12)
    base.load_state_dict(layer.base.state_dict())
    # A and B both random (Kaiming uniform bounds: 1/sqrt(fan_in)), s = 0
    assert (layer.lora_B != 0).all() and (layer.lora_A != 0).all()
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(20) + 1e-6
    assert layer.lora_B.abs().max() <= 1 / math.sqrt(4) + 1e-6
    assert (layer.lora_s == 0).all()
    x = torch.randn(6, 20)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # dW = 0 exactly
    assert torch.count_nonzero(layer.delta_weight()) == 0

    layer(x).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) == 0
    assert torch.count_nonzero(layer.lora_s.grad) > 0

    before = {k: p.detach().clone() for k, p in layer.named_parameters() if k.startswith("lora_")}
    opt = torch.optim.AdamW([p for k, p in layer.named_parameters() if k.startswith("lora_")], lr=1e-2)
    for _ in range(2):  # step 0 moves s; step 1 moves A and B through the now non-zero s
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    for k, p in layer.named_parameters():
        if k.startswith("lora_"):
            assert not torch.equal(p, before[k]), f"{k} did not move"


def test_lora_init_has_zero_B_and_kaiming_A():
    layer = make_layer(n=1, r=4, init="lora", scale="none")
    assert (layer.lora_B == 0).all()
    assert (layer.lora_A != 0).all() and layer.lora_A.abs().max() <= 1 / math.sqrt(20) + 1e-6
    # with the lora init but learnable scales (an ablation), s starts at 1
    assert (make_layer(n=2, r=4, init="lora", scale="vector").lora_s == 1).all()


def test_n1_lora_matches_peft_lora_with_same_A_and_B():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(20, 12)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = Tiny()
    ref = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    ref.base_model.model.proj.base_layer.load_state_dict(net.proj.state_dict())
    ours = MultiLoRALinear(net.proj, n=1, r=4, alpha=8.0, init="lora", scale="none")
    with torch.no_grad():
        ours.lora_A.copy_(torch.randn(1, 4, 20))
        ours.lora_B.copy_(torch.randn(1, 12, 4))
        ref.base_model.model.proj.lora_A["default"].weight.copy_(ours.lora_A[0])
        ref.base_model.model.proj.lora_B["default"].weight.copy_(ours.lora_B[0])
    x = torch.randn(3, 20)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_and_no_double_apply(kind):
    layer = make_layer(kind, n=3, r=4)
    with torch.no_grad():
        layer.lora_s.normal_()
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(4, 20)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.merge()  # idempotent: never adds dW twice
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_and_leaves_weight_alone():
    layer = make_layer(n=2, r=4)
    with torch.no_grad():
        layer.lora_s.fill_(1.0)
        layer.lora_B[0, 0, 0] = float("inf")
    w0 = layer.base.weight.detach().clone()
    with pytest.raises(MultiLoRAError, match="NaN/inf"):
        layer.merge()
    assert torch.equal(layer.base.weight, w0) and not layer.merged


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n=0), "n must be an integer >= 1"),
        (dict(r=-2), "r must be an integer >= 1"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(init="gaussian"), "init must be one of multilora, lora"),
        (dict(scale="matrix"), "scale must be one of vector, scalar, none"),
        (dict(scale="none", init="multilora"), "scale='none' needs init='lora'"),
        (dict(scale_init=float("inf")), "scale_init must be a finite number"),
        (dict(scale="none", init="lora", scale_init=0.5), "scale_init is set but scale='none'"),
    ],
)
def test_bad_options_are_named(kw, message):
    with pytest.raises(MultiLoRAError, match=message):
        make_layer(**kw)


def test_only_linear_layers_can_be_wrapped():
    with pytest.raises(MultiLoRAError, match="not Embedding"):
        MultiLoRALinear(nn.Embedding(10, 4))


@pytest.mark.parametrize("scale", ["vector", "scalar"])
def test_scale_init_keeps_dw_zero_only_with_the_lora_init(scale):
    x = torch.randn(4, 20)
    for init, zero_dw in (("lora", True), ("multilora", False)):
        layer = make_layer(n=2, r=4, init=init, scale=scale, scale_init=0.5)
        assert torch.equal(layer.lora_s, torch.full_like(layer.lora_s, 0.5))
        expected = loop_reference(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                                  layer.lora_s, layer.alpha, layer.r)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        assert (layer.delta_weight().abs().max() == 0) == zero_dw, init
    assert torch.count_nonzero(make_layer(scale=scale).lora_s) == 0  # the default: s = 0, dW = 0
