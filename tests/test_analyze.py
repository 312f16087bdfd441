"""Analysis of dW: exact QR-route spectra, metrics, adapter / PEFT / full-FT runs, the CLI outputs."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import multilora as ml
from conftest import make_tiny, randomize_adapters
from multilora.analyze import add_analyze_arguments, analyze, analyze_run, run_analyze_cli
from multilora.spectra import lowrank_svdvals, module_depth, module_shares, module_type, spectrum_metrics, subspace_metrics


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Elementwise |a - b| <= rtol * max|b| (relative to the largest singular value)."""
    return bool((a.double() - b.double()).abs().max() <= rtol * b.double().abs().max())


# --- exact spectra -----------------------------------------------------------------------------


@pytest.mark.parametrize("d_out,d_in,k", [(64, 48, 8), (40, 96, 24), (6, 50, 16), (50, 7, 16), (5, 4, 12),
                                          (128, 128, 1)])  # k > min(d_in, d_out) in three cases
def test_qr_route_equals_dense_svd(d_out, d_in, k):
    g = torch.Generator().manual_seed(d_out * 1000 + d_in + k)
    B, A = torch.randn(d_out, k, generator=g), torch.randn(k, d_in, generator=g)
    ours = lowrank_svdvals(B, A)
    dense = torch.linalg.svdvals(B.double() @ A.double())  # (min(d_out, d_in),)
    m = min(d_out, d_in, k)
    assert ours.shape == (m,) and ours.dtype == torch.float64
    assert rel_close(ours, dense[:m], 1e-5)
    assert (dense[m:] <= 1e-10 * dense[0]).all()  # rank <= k: nothing beyond the first k


def test_qr_route_rank_deficient_B_and_vectors():
    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    B = torch.randn(30, 2, generator=g, dtype=f64) @ torch.randn(2, 12, generator=g, dtype=f64)  # (30, 12), rank 2
    A = torch.randn(12, 40, generator=g, dtype=f64)
    ours = lowrank_svdvals(B, A)
    dense = torch.linalg.svdvals(B.double() @ A.double())
    assert rel_close(ours, dense[:12], 1e-5)
    assert (ours[2:] <= 1e-10 * ours[0]).all()
    U, S, Vh = lowrank_svdvals(B, A, vectors=True)  # (30, m), (m,), (m, 40)
    assert torch.allclose(U @ torch.diag(S) @ Vh, B.double() @ A.double(), atol=1e-9)
    assert torch.allclose(Vh[:2] @ Vh[:2].T, torch.eye(2, dtype=torch.float64), atol=1e-9)


def test_qr_route_rejects_mismatched_factors():
    with pytest.raises(ml.MultiLoRAError, match=r"needs B \(d_out, k\) and A \(k, d_in\), got \(4, 3\) and \(2, 5\)"):
        lowrank_svdvals(torch.ones(4, 3), torch.ones(2, 5))


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_on_diagonal_example():
    m = spectrum_metrics(torch.tensor([3.0, 1.0, 0.0]), top_k=(1, 2, 8))  # dW = diag(3, 1, 0)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert m["spectrum"] == pytest.approx([0.75, 0.25, 0.0])
    assert m["entropy"] == pytest.approx(entropy)
    assert m["effective_rank"] == pytest.approx(math.exp(entropy))
    assert m["energy_top1"] == pytest.approx(0.9)
    assert m["energy_top2"] == pytest.approx(1.0)
    assert m["energy_top8"] == pytest.approx(1.0)  # k beyond the spectrum's length: everything
    assert m["stable_rank"] == pytest.approx(10 / 9)
    assert m["frobenius"] == pytest.approx(math.sqrt(10))
    assert m["sigma_max"] == 3.0 and m["numerical_rank"] == 2 and m["note"] == ""


def test_metrics_flat_spectrum_and_zero_update():
    flat = spectrum_metrics([2.0] * 8)
    assert flat["effective_rank"] == pytest.approx(8) and flat["stable_rank"] == pytest.approx(8)
    assert flat["energy_top1"] == pytest.approx(1 / 8) and flat["energy_top4"] == pytest.approx(0.5)
    zero = spectrum_metrics(torch.zeros(5))
    assert zero["frobenius"] == 0.0 and zero["numerical_rank"] == 0 and "dW is zero" in zero["note"]
    assert all(math.isnan(zero[k]) for k in ("effective_rank", "stable_rank", "energy_top1", "entropy"))


def test_module_type_and_depth():
    assert module_type("model.layers.3.self_attn.q_proj") == "q"
    assert module_depth("model.layers.3.self_attn.q_proj") == 3
    assert module_type("model.layers.11.mlp.down_proj") == "down"
    assert module_depth("model.layers.11.mlp.down_proj") == 11
    assert module_type("transformer.h.0.attn.c_attn") == "c_attn" and module_depth("transformer.h.0.attn.c_attn") == 0
    assert module_depth("lm_head") is None


def test_module_shares_equal_dense_norms():
    g = torch.Generator().manual_seed(5)
    n, r, d_in, d_out = 3, 4, 20, 16
    A, B = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    s = torch.randn(n, d_out, generator=g)
    s[2] *= 0.1
    a_cat, b_s = ml.layers.fuse(A, B, s, 2.0)
    fro, share = module_shares(a_cat, b_s, n)
    dense = [float((2.0 * s[i, :, None] * (B[i] @ A[i])).norm()) for i in range(n)]  # the slow, obvious way
    assert fro == pytest.approx(dense, rel=1e-6)
    assert share == pytest.approx([d / sum(dense) for d in dense], rel=1e-6)


# --- runs: our adapter folder, its PEFT export, plain LoRA, full fine-tuning ---------------------


@pytest.fixture(scope="module")
def multilora_dir(tmp_path_factory):
    """A saved MultiLoRA adapter (n=3, r=4, all seven projections) with random values, on make_tiny('llama') seed 0."""
    torch.manual_seed(0)
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    out = tmp_path_factory.mktemp("runs") / "multilora"
    ml.save_adapter(model, out)
    return out


def test_our_folder_and_its_peft_export_give_the_same_spectra(multilora_dir, tmp_path):
    ours = analyze_run(multilora_dir)
    ml.export_peft(multilora_dir, tmp_path / "peft")
    theirs = analyze_run(tmp_path / "peft")
    assert ours["kind"] == "multilora" and theirs["kind"] == "peft-lora"
    assert len(ours["layers"]) == 14  # 2 layers x 7 projections
    assert [r["module"] for r in ours["layers"]] == [r["module"] for r in theirs["layers"]]
    for a, b in zip(ours["layers"], theirs["layers"]):
        assert rel_close(torch.tensor(b["sigma"]), torch.tensor(a["sigma"]), 1e-5)
        assert a["numerical_rank"] == b["numerical_rank"] == 12 == a["rank_bound"] == b["rank_bound"]  # n r, not more
    assert list(ours["by_type"]) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert set(ours["by_depth"]) == {"0", "1"} and ours["by_type"]["q"]["layers"] == 2


def test_multilora_spectra_match_dense_delta_weight(multilora_dir):
    model = ml.load_adapter(make_tiny("llama"), multilora_dir)
    run = analyze_run(multilora_dir)
    mods = ml.adapter_modules(model)
    for rec in run["layers"]:
        with torch.no_grad():
            dense = torch.linalg.svdvals(mods[rec["module"]].delta_weight().double())
        assert rel_close(torch.tensor(rec["sigma"]), dense[: len(rec["sigma"])], 1e-5)
        assert len(rec["module_share"]) == 3 and sum(rec["module_share"]) == pytest.approx(1.0)
        assert len(rec["scale_norms"]) == 3 and all(v > 0 for v in rec["scale_norms"])


def test_plain_lora_of_known_rank(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig.lora(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = U diag(4, 2, 1, 1), A = V^T with orthonormal U, V: dW = (alpha / r) B A has known sigma
        for m in ml.adapter_modules(model).values():
            d_out, d_in = m.d_out, m.d_in
            u = torch.linalg.qr(torch.randn(d_out, 4))[0]  # (d_out, 4) orthonormal
            v = torch.linalg.qr(torch.randn(d_in, 4))[0]  # (d_in, 4) orthonormal
            m.lora_B[0].copy_(u * torch.tensor([4.0, 2.0, 1.0, 1.0]))
            m.lora_A[0].copy_(v.T)
    ml.save_adapter(model, tmp_path / "lora")
    run = analyze_run(tmp_path / "lora", top_k=(1, 4))
    assert run["kind"] == "lora" and len(run["layers"]) == 4
    sigma = torch.tensor([8.0, 4.0, 2.0, 2.0])  # alpha / r = 2 times (4, 2, 1, 1)
    p = sigma / sigma.sum()
    for rec in run["layers"]:
        assert rec["sigma"] == pytest.approx(sigma.tolist(), rel=1e-5)
        assert rec["numerical_rank"] == 4 and rec["rank_bound"] == 4
        assert rec["energy_top1"] == pytest.approx(64 / 88) and rec["energy_top4"] == pytest.approx(1.0)
        assert rec["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
        assert rec["stable_rank"] == pytest.approx(88 / 64)
        assert "module_share" not in rec and "scale_norms" not in rec


def test_untrained_multilora_is_reported_as_zero(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=2, alpha=4, targets=["q_proj"]))  # s = 0 -> dW = 0
    ml.save_adapter(model, tmp_path / "fresh")
    run = analyze_run(tmp_path / "fresh")
    assert all(rec["frobenius"] == 0.0 and rec["note"] for rec in run["layers"])
    assert math.isnan(run["overall"]["effective_rank"])


def _full_run(tmp_path):
    """A tiny base model folder and a 'fine-tuned' copy whose q_proj of layer 0 moved by a rank-2 update."""
    base = make_tiny("llama")
    base.save_pretrained(tmp_path / "base")
    sd = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    key = "model.layers.0.self_attn.q_proj.weight"
    u, v = torch.linalg.qr(torch.randn(64, 2, generator=g))[0], torch.linalg.qr(torch.randn(64, 2, generator=g))[0]
    sd[key] += u @ torch.diag(torch.tensor([3.0, 1.0])) @ v.T  # (64, 64), sigma = (3, 1)
    sd["model.layers.1.mlp.up_proj.weight"] += 0.01 * torch.randn(128, 64, generator=g)  # dense, tall
    sd["model.layers.1.mlp.down_proj.weight"] += 0.01 * torch.randn(64, 128, generator=g)  # dense, wide
    (tmp_path / "full").mkdir()
    save_file(sd, str(tmp_path / "full" / "model.safetensors"))
    return tmp_path / "base", tmp_path / "full"


def test_full_finetuning_diff(tmp_path):
    base, full = _full_run(tmp_path)
    run = analyze_run(full, base=base, top_k=(1,))
    assert run["kind"] == "full" and len(run["layers"]) == 14  # every projection, no embeddings / head
    by = {rec["module"]: rec for rec in run["layers"]}
    q = by["model.layers.0.self_attn.q_proj"]
    assert q["sigma"][:3] == pytest.approx([3.0, 1.0, 0.0], abs=1e-5) and q["numerical_rank"] == 2
    assert q["energy_top1"] == pytest.approx(0.9, rel=1e-5)
    assert q["effective_rank"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-4)
    assert by["model.layers.1.mlp.up_proj"]["numerical_rank"] == 64 and by["model.layers.1.mlp.up_proj"]["type"] == "up"
    tuned, w0 = load_file(str(full / "model.safetensors")), load_file(str(base / "model.safetensors"))
    for name in ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):  # (128, 64) and (64, 128)
        dw = tuned[f"{name}.weight"].double() - w0[f"{name}.weight"].double()
        assert by[name]["sigma"] == pytest.approx(torch.linalg.svdvals(dw).tolist(), rel=1e-4, abs=1e-6)
    assert by["model.layers.0.self_attn.k_proj"]["frobenius"] == 0.0  # unchanged weight: dW = 0, reported


def test_full_run_reads_the_recorded_base(tmp_path):
    base, full = _full_run(tmp_path)
    with pytest.raises(ml.MultiLoRAError, match="records no base model: pass --base MODEL"):
        analyze_run(full)
    (full / "config.yaml").write_text(f"method: full\nmodel: {base}\n")
    run = analyze_run(full, subspace=True, top_k=(1, 8))
    assert run["base_model"] == str(base)
    q = next(rec for rec in run["layers"] if rec["module"] == "model.layers.0.self_attn.q_proj")
    assert q["subspace_k"] == 2 and 0.0 <= q["w0_overlap"] <= 1.0  # dW has rank 2: k = min(8, rank)


def test_trainer_full_run_layouts(tmp_path):
    base, full = _full_run(tmp_path)
    (full / "full_model.json").write_text(json.dumps({"method": "full", "base_model": {"name_or_path": str(base)}}))
    assert analyze_run(full)["base_model"] == str(base)  # `multilora train`'s layout: base from full_model.json
    (full / "full_model.json").unlink()
    (full / "model.safetensors").rename(full / "adapter.safetensors")  # DESIGN.md's run folder for method full
    (full / "config.yaml").write_text(f"method: full\nmodel:\n  name_or_path: {base}\n")
    run = analyze_run(full)
    assert run["kind"] == "full" and len(run["layers"]) == 14 and run["base_model"] == str(base)


# --- errors and the CLI --------------------------------------------------------------------------


def test_not_an_adapter_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ml.MultiLoRAError, match=r"is not an adapter or run folder: expected adapter_config.json"):
        analyze_run(tmp_path)
    with pytest.raises(ml.MultiLoRAError, match="is not a folder"):
        analyze_run(tmp_path / "missing")
    with pytest.raises(ml.MultiLoRAError, match="2 names for 1 runs"):
        analyze([tmp_path], tmp_path / "out", names=["a", "b"])
    with pytest.raises(ml.MultiLoRAError, match=r"top-k values must be integers >= 1, got \(0, 4\)"):
        analyze([tmp_path], tmp_path / "out", top_k=[4, 0])
    with pytest.raises(ml.MultiLoRAError, match="notes.txt is a file; pass a folder"):
        analyze([tmp_path], tmp_path / "notes.txt")


def test_non_finite_adapter_is_refused(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=2, alpha=4, targets=["q_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        ml.adapter_modules(model)["model.layers.1.self_attn.q_proj"].lora_B[0, 0, 0] = float("nan")
    ml.save_adapter(model, tmp_path / "nan")
    with pytest.raises(ml.MultiLoRAError, match=r"'model.layers.1.self_attn.q_proj.lora_B' .* holds NaN or inf values"):
        analyze_run(tmp_path / "nan")


def test_cli_writes_every_file(multilora_dir, tmp_path, capsys):
    base, full = _full_run(tmp_path)
    ml.export_peft(multilora_dir, tmp_path / "peft")
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    out = tmp_path / "report"
    args = parser.parse_args([str(multilora_dir), str(tmp_path / "peft"), str(full), "--out", str(out),
                              "--base", str(base), "--names", "multi,peft,full", "--top-k", "1,4", "--subspace"])
    run_analyze_cli(args)
    files = {"analysis.json", "analysis.csv", "summary.md", "spectra.png", "effective_rank_by_depth.png",
             "energy_share.png", "multilora_scales.png"}
    assert files <= {p.name for p in out.iterdir()}
    report = json.loads((out / "analysis.json").read_text())  # strict JSON: NaN written as null
    assert [r["name"] for r in report["runs"]] == ["multi", "peft", "full"] and report["top_k"] == [1, 4]
    rows = list(csv.DictReader((out / "analysis.csv").open()))
    assert len(rows) == 14 * 3 and {"run", "module", "type", "depth", "energy_top4", "effective_rank"} <= set(rows[0])
    summary = (out / "summary.md").read_text()
    assert "| multi | multilora | 14 |" in summary and "![" in summary and "spectra.png" in summary
    assert "| multi | 4 |" in summary  # the subspace table (k = max top-k)
    assert rows[0]["w0_overlap"] != ""
    assert "wrote analysis.json" in capsys.readouterr().out


def test_gpt2_conv1d_adapter_matches_dense(tmp_path):
    model = make_tiny("gpt2")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=3, alpha=6, scale="scalar", targets="all-linear"))
    randomize_adapters(model)
    ml.save_adapter(model, tmp_path / "gpt2")
    run = analyze_run(tmp_path / "gpt2")
    mods = ml.adapter_modules(model)
    assert {rec["type"] for rec in run["layers"]} == {"c_attn", "c_proj", "c_fc"}
    for rec in run["layers"]:
        with torch.no_grad():
            dense = torch.linalg.svdvals(mods[rec["module"]].delta_weight().double())  # Conv1D layout: dW^T, same sigma
        assert rel_close(torch.tensor(rec["sigma"]), dense[:6], 1e-5)


def test_peft_trained_adapter_scaling_conventions(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_tiny("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "peft")
    run = analyze_run(tmp_path / "peft")
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
                   if hasattr(m, "get_delta_weight")}
    assert len(run["layers"]) == 4
    for rec in run["layers"]:
        with torch.no_grad():
            dense = torch.linalg.svdvals(lora_layers[rec["module"]].get_delta_weight("default").double())
        assert rec["rank_bound"] == (2 if rec["type"] == "v" else 4)
        assert rel_close(torch.tensor(rec["sigma"]), dense[: rec["rank_bound"]], 1e-5)


def test_subspace_metrics_against_w0(multilora_dir, tmp_path):
    base = make_tiny("llama")  # the same seed-0 weights the adapter was made on
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ml.MultiLoRAError, match="records no base model, which the subspace analysis needs"):
        analyze_run(multilora_dir, subspace=True)
    run = analyze_run(multilora_dir, base=tmp_path / "base", subspace=True, top_k=(4,))
    for rec in run["layers"]:
        assert rec["subspace_k"] == 4 and 0.0 <= rec["w0_overlap"] <= 1.0 and rec["amplification"] > 0
    assert "w0_overlap" in run["overall"] and "amplification" in run["by_type"]["q"]
    # a dW built from W0's own top-2 directions overlaps fully and is not amplified beyond sigma ratios
    w0 = base.state_dict()["model.layers.0.self_attn.q_proj.weight"].double()  # (64, 64)
    u0, s0, vh0 = torch.linalg.svd(w0)
    B, A = u0[:, :2] * s0[:2], vh0[:2]  # dW = top-2 part of W0
    u, sigma, vh = lowrank_svdvals(B, A, vectors=True)
    m = subspace_metrics(u, sigma, vh, w0, 2)
    assert m["w0_overlap"] == pytest.approx(1.0) and m["amplification"] == pytest.approx(1.0)
    assert m["w0_overlap_chance"] == pytest.approx(2 / 64)
