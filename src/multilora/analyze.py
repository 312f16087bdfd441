"""Singular-value spectra of learned weight updates dW (MULTILORA.md §5), their metrics, plots.

For a low-rank update dW = B A (B: (d_out, k), A: (k, d_in), k = n r) the singular values are
computed exactly without forming the dense (d_out, d_in) matrix:

    Q_B R_B = qr(B)          Q_A R_A = qr(A^T)          svd(R_B R_A^T) = U' S V'^T
    dW = Q_B R_B R_A^T Q_A^T = (Q_B U') S (Q_A V')^T

Q_B and Q_A have orthonormal columns, so S is dW's spectrum. Cost O((d_in + d_out) k^2) instead
of O(d_in d_out min(d_in, d_out)) for a dense SVD. Full fine-tuning updates dW = W_ft - W0 are
dense: they get a dense float32 `torch.linalg.svdvals`.

Per layer we report (sigma sorted descending, p_j = sigma_j / sum sigma):
    spectrum          p (the normalized spectrum)
    energy_top{k}     sum_{j<=k} sigma_j^2 / sum sigma^2     (share of ||dW||_F^2)
    effective_rank    exp(H(p)), H(p) = -sum p_j ln p_j      (Roy & Vetterli 2007)
    stable_rank       ||dW||_F^2 / sigma_1^2
    frobenius         ||dW||_F;  numerical_rank: sigma_j > rtol * sigma_1
An all-zero dW (e.g. an untrained MultiLoRA adapter, s = 0) gets frobenius 0, rank 0, NaN for
the ratios and a `note`; it never raises. MultiLoRA adapters also get, per layer, each module's
||s_i B_i A_i||_F and its share of the sum (`module_fro`, `module_share`) and ||s_i||_2
(`scale_norms`). With `subspace=True`, `subspace_metrics` compares dW's top singular directions
with W0's (LoRA paper, section 7); it needs the base weights and a dense SVD of each W0.

Inputs `analyze_run` understands (detected from the files in the folder):
    multilora adapter / run folder   adapter_config.json (format multilora-adapter) + adapter.safetensors
    PEFT LoRA adapter                adapter_config.json (peft_type LORA) + adapter_model.safetensors
    full fine-tuning run             model.safetensors (or model.safetensors.index.json + shards), as
                                     `multilora train` writes it (a save_pretrained folder +
                                     full_model.json), or adapter.safetensors with method "full" in
                                     config.yaml / adapter_config.json;
                                     the base weights come from `base=` (a model folder, a
                                     .safetensors file or 'smollm2-135m'), else from the base model
                                     recorded in the run (config.yaml `model` / `base_model`, else
                                     full_model.json / adapter_config.json `base_model.name_or_path`,
                                     else config.json `_name_or_path`). Tensors are
                                     matched by their state-dict key; every 2-D `.weight` outside
                                     the embeddings and the output head is analysed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import MultiLoRAError
from .io import atomic_path, read_json_object, write_json_atomic, write_text_atomic
from .layers import fuse

ANALYSIS_VERSION = 1
TOP_K = (1, 4, 8)
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
_LEAF_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}
_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out")  # leaf-name parts skipped in full-FT state dicts
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_EPS32 = torch.finfo(torch.float32).eps
SUBSPACE_METRICS = ("subspace_k", "w0_overlap", "w0_overlap_chance", "amplification")


# --- exact spectra -----------------------------------------------------------------------------


def lowrank_svdvals(
    B: torch.Tensor, A: torch.Tensor, vectors: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values (descending, float64, length min(d_out, d_in, k)) of B @ A without forming it.

    With `vectors=True` returns (U (d_out, m), S (m,), Vh (m, d_in)) with B @ A = U diag(S) Vh.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise MultiLoRAError(
            f"lowrank_svdvals needs B (d_out, k) and A (k, d_in), got {tuple(B.shape)} and {tuple(A.shape)}")
    B64, A64 = B.detach().to(torch.float64), A.detach().to(torch.float64)
    q_b, r_b = torch.linalg.qr(B64)  # (d_out, m_b), (m_b, k), m_b = min(d_out, k)
    q_a, r_a = torch.linalg.qr(A64.T)  # (d_in, m_a), (m_a, k), m_a = min(d_in, k)
    core = r_b @ r_a.T  # (m_b, m_a): dW = q_b core q_a^T
    if not vectors:
        return torch.linalg.svdvals(core)  # (min(m_b, m_a),)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (m_b, m), (m,), (m, m_a)
    return q_b @ u, s, vh @ q_a.T  # (d_out, m), (m,), (m, d_in)


def dense_svdvals(dw: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float32) of a dense update, e.g. W_ft - W0."""
    return torch.linalg.svdvals(dw.detach().to(torch.float32))


def spectrum_metrics(sigma: torch.Tensor | Sequence[float], top_k: Iterable[int] = TOP_K,
                     rtol: float | None = None) -> dict[str, Any]:
    """Metrics of one spectrum (see the module docstring); NaN ratios and a `note` for a zero dW.

    `rtol` (relative to sigma_1) sets `numerical_rank`; default len(sigma) * float32 eps.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).flatten().clamp_min(0.0).sort(descending=True).values
    m = s.numel()
    rtol = m * _EPS32 if rtol is None else rtol
    if not torch.isfinite(s).all():
        raise MultiLoRAError("the update dW holds NaN or inf values; the weights are corrupt")
    energy = float((s * s).sum())
    total = float(s.sum())
    out: dict[str, Any] = {
        "frobenius": math.sqrt(energy),
        "sigma_max": float(s[0]) if m else 0.0,
        "nuclear": total,
    }
    nan = float("nan")
    if total == 0.0:
        out.update(numerical_rank=0, entropy=nan, effective_rank=nan, stable_rank=nan,
                   **{f"energy_top{k}": nan for k in top_k}, spectrum=[0.0] * m,
                   note="dW is zero (e.g. an untrained adapter with s = 0): ratios are undefined (NaN)")
        return out
    p = s / total  # (m,) normalized spectrum
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    cum = (s * s).cumsum(0) / energy  # (m,) energy share of the top-j directions
    out.update(
        numerical_rank=int((s > rtol * s[0]).sum()),
        entropy=entropy,
        effective_rank=math.exp(entropy),
        stable_rank=energy / float(s[0]) ** 2,
        **{f"energy_top{k}": float(cum[min(k, m) - 1]) for k in top_k},
        spectrum=p.tolist(),
        note="",
    )
    return out


def module_shares(a_cat: torch.Tensor, b_s: torch.Tensor, n: int) -> tuple[list[float], list[float]]:
    """(||dW_i||_F, share_i) of each of the n modules in dW = B_s A_cat = sum_i B_s,i A_i.

    ||B_i A_i||_F^2 = tr((B_i^T B_i)(A_i A_i^T)): two (r, r) Gram matrices per module, cost
    O(n r^2 (d_in + d_out)); no dense (d_out, d_in) product is formed.
    """
    k, d_in = a_cat.shape
    d_out, r = b_s.shape[0], k // n
    a = a_cat.detach().to(torch.float64).reshape(n, r, d_in)  # (n, r, d_in)
    b = b_s.detach().to(torch.float64).reshape(d_out, n, r).transpose(0, 1)  # (n, d_out, r), s and alpha/r folded in
    g_a = a @ a.transpose(1, 2)  # (n, r, r)
    g_b = b.transpose(1, 2) @ b  # (n, r, r)
    fro = (g_a * g_b).sum(dim=(1, 2)).clamp_min(0.0).sqrt()  # (n,): tr(G_B G_A), both symmetric
    total = float(fro.sum())
    shares = (fro / total).tolist() if total > 0 else [float("nan")] * n
    return fro.tolist(), shares


# --- reading runs ------------------------------------------------------------------------------


def module_type(path: str) -> str:
    """q, k, v, o, gate, up, down for the usual projection names, else the leaf name."""
    leaf = path.rsplit(".", 1)[-1]
    return _LEAF_TYPES.get(leaf, leaf)


def module_depth(path: str) -> int | None:
    """The layer index in a module path (`model.layers.3.mlp.up_proj` -> 3), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def _layer_record(path: str, sigma: torch.Tensor, d_out: int, d_in: int, rank_bound: int,
                  top_k: Sequence[int]) -> dict[str, Any]:
    """One layer's entry in the analysis: identity, sizes, sigma and its metrics."""
    metrics = spectrum_metrics(sigma, top_k, rtol=max(d_out, d_in) * _EPS32)
    spectrum = metrics.pop("spectrum")
    return {"module": path, "type": module_type(path), "depth": module_depth(path), "d_out": d_out,
            "d_in": d_in, "rank_bound": min(rank_bound, d_out, d_in), **metrics,
            "sigma": [float(x) for x in sigma.tolist()], "spectrum": spectrum}


def detect_kind(path: str | Path) -> str:
    """'multilora', 'peft' or 'full' from the files in `path`, or a MultiLoRAError saying what is expected."""
    d = Path(path)
    if not d.is_dir():
        raise MultiLoRAError(f"{d} is not a folder: pass an adapter folder, a PEFT LoRA adapter or a run folder")
    cfg = d / "adapter_config.json"
    if cfg.is_file():
        meta = read_json_object(cfg, fix="re-save the adapter")
        if "peft_type" in meta:
            return "peft"
        if meta.get("method") == "full":
            return "full"
        return "multilora"  # read_adapter validates it and names any problem
    if any((d / f).is_file() for f in _FULL_WEIGHTS):
        return "full"
    if (d / "adapter.safetensors").is_file() and _run_config(d).get("method") == "full":
        return "full"  # a trainer run that keeps the full weights in adapter.safetensors (DESIGN.md)
    raise MultiLoRAError(
        f"{d} is not an adapter or run folder: expected adapter_config.json + adapter.safetensors (multilora), "
        "adapter_config.json + adapter_model.safetensors (PEFT LoRA) or model.safetensors (full fine-tuning)"
    )


def analyze_run(path: str | Path, base: str | Path | None = None, name: str | None = None,
                top_k: Sequence[int] = TOP_K, subspace: bool = False) -> dict[str, Any]:
    """Spectra and metrics of every adapted layer of one run, aggregated per module type and depth.

    `base`: the base model (folder, .safetensors file or 'smollm2-135m'), needed by full
    fine-tuning runs and by `subspace=True`; default: the one the run records.
    `subspace=True` adds `subspace_metrics` against W0 per layer (a dense SVD of each W0: slow).
    """
    top_k = tuple(sorted(set(int(k) for k in top_k)))
    if not top_k or top_k[0] < 1:
        raise MultiLoRAError(f"top-k values must be integers >= 1, got {top_k!r}")
    kind = detect_kind(path)
    with ExitStack() as stack:
        if kind == "multilora":
            run = _analyze_multilora(Path(path), top_k, base, subspace, stack)
        elif kind == "peft":
            run = _analyze_peft(Path(path), top_k, base, subspace, stack)
        else:
            run = _analyze_full(Path(path), base, top_k, subspace, stack)
    run["layers"].sort(key=_layer_order)  # PEFT files are sorted by key; give every kind one order
    run = {"name": name or Path(path).resolve().name, "path": str(path), **run}
    run["by_type"] = aggregate(run["layers"], "type", top_k)
    run["by_depth"] = aggregate(run["layers"], "depth", top_k)
    run["overall"] = aggregate(run["layers"], None, top_k)["all"]
    return run


def _layer_order(rec: dict[str, Any]) -> tuple:
    """Sort key: depth, then q k v o gate up down, then other leaf names, then the path."""
    t = rec["type"]
    return (-1 if rec["depth"] is None else rec["depth"], TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER),
            rec["module"])


def _analyze_multilora(d: Path, top_k: Sequence[int], base: str | Path | None, subspace: bool,
                       stack: ExitStack) -> dict[str, Any]:
    """Our adapter (or trainer run) folder: fuse each module's factors, QR-route spectra, scale shares."""
    from .checkpoint import read_adapter

    meta, tensors = read_adapter(d)
    n, r, scaling = meta["n"], meta["r"], meta["alpha"] / meta["r"]
    recorded = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    w0_of = _base_weights(base or recorded.get("name_or_path"), d, stack) if subspace else None
    layers = []
    for path in meta["modules"]:
        try:
            lora_A, lora_B = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]  # (n, r, d_in), (n, d_out, r)
        except KeyError as e:
            raise MultiLoRAError(
                f"{d}: tensor {e.args[0]!r} is missing from the adapter file; re-save the adapter") from None
        lora_s = tensors.get(f"{path}.lora_s")  # (n, d_out), (n,) or None
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("lora_s", lora_s)):
            _check_finite(t, f"adapter tensor '{path}.{name}' in {d}")
        d_out = lora_B.shape[1] if lora_B.dim() == 3 else -1
        if (lora_A.dim() != 3 or tuple(lora_A.shape[:2]) != (n, r) or tuple(lora_B.shape) != (n, d_out, r)
                or (lora_s is not None and tuple(lora_s.shape) not in {(n, d_out), (n,)})):
            shapes = f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}" + (
                f", lora_s {tuple(lora_s.shape)}" if lora_s is not None else "")
            raise MultiLoRAError(f"{d}: module {path!r} has {shapes}, which do not fit n={n}, r={r} (lora_A "
                                 "(n, r, d_in), lora_B (n, d_out, r), lora_s (n, d_out) or (n,)); re-save the adapter")
        a_cat, b_s = fuse(lora_A.double(), lora_B.double(), None if lora_s is None else lora_s.double(), scaling)
        w0 = w0_of(path, b_s.shape[0], a_cat.shape[1], meta["fan_in_fan_out"]) if w0_of else None
        rec = _low_rank_record(path, b_s, a_cat, n * r, top_k, w0)
        if n > 1 or lora_s is not None:  # the MultiLoRA view: which modules carry dW, and the scales
            rec["module_fro"], rec["module_share"] = module_shares(a_cat, b_s, n)
        if lora_s is not None:
            rec["scale_norms"] = lora_s.double().reshape(n, -1).norm(dim=1).tolist()  # ||s_i||_2
        layers.append(rec)
    return {"kind": meta.get("method", "multilora"), "n": n, "r": r, "alpha": meta["alpha"],
            "scale": meta.get("scale"), "layers": layers,
            "base_model": str(base) if subspace and base else recorded.get("name_or_path") or None}


def _analyze_peft(d: Path, top_k: Sequence[int], base: str | Path | None, subspace: bool,
                  stack: ExitStack) -> dict[str, Any]:
    """A PEFT LoRA adapter: dW = (lora_alpha / r) lora_B.weight @ lora_A.weight per module."""
    from safetensors.torch import load_file

    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise MultiLoRAError(
            f"{d} is a PEFT {cfg.get('peft_type')} adapter; only LoRA adapters (peft_type LORA) can be analysed")
    if cfg.get("use_dora"):
        raise MultiLoRAError(
            f"{d} is a DoRA adapter (use_dora: true), whose update is not B A; only plain LoRA can be analysed")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        from .export import refuse_pickled_peft

        refuse_pickled_peft(d)  # never unpickle: say how to convert instead
        raise MultiLoRAError(f"{weights} is missing: a PEFT LoRA adapter folder holds adapter_model.safetensors")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for a bad file
        raise MultiLoRAError(f"{weights} is not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise MultiLoRAError(f"{weights} holds no lora_A/lora_B weights; is it a LoRA adapter?")
    w0_of = _base_weights(base or cfg.get("base_model_name_or_path"), d, stack) if subspace else None
    layers = []
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MultiLoRAError(f"{weights}: module {path!r} has lora_{next(iter(ab))} but not its partner")
        A, B = ab["A"], ab["B"]  # (R, d_in), (d_out, R)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MultiLoRAError(f"{weights}: module {path!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                 "which do not multiply (only linear LoRA layers are supported)")
        _check_finite(A, f"{weights}: '{path}' lora_A")
        _check_finite(B, f"{weights}: '{path}' lora_B")
        rank = A.shape[0]
        recorded = _pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", rank))
        if recorded != rank:
            raise MultiLoRAError(f"{weights}: module {path!r} has rank {rank} (lora_A {tuple(A.shape)}), inconsistent "
                                 f"with r = {recorded!r} in {d / 'adapter_config.json'}; the adapter is corrupt")
        alpha = _pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", rank))
        scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        w0 = w0_of(path, B.shape[0], A.shape[1], bool(cfg.get("fan_in_fan_out"))) if w0_of else None
        layers.append(_low_rank_record(path, B.double() * scaling, A.double(), rank, top_k, w0))
    ranks = sorted({ab["A"].shape[0] for ab in pairs.values()})
    return {"kind": "peft-lora", "n": 1, "r": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": cfg.get("lora_alpha"), "scale": None,
            "base_model": str(base) if subspace and base else cfg.get("base_model_name_or_path") or None,
            "layers": layers}


def _check_finite(t: torch.Tensor | None, what: str) -> None:
    """Raise a MultiLoRAError if `t` holds NaN or inf (a corrupt file or a diverged run)."""
    if t is not None and not torch.isfinite(t).all():
        raise MultiLoRAError(f"{what} holds NaN or inf values: the run diverged or the file is corrupt; "
                             "analyse an earlier checkpoint")


def _pattern_value(patterns: Any, path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if path == key or re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


def _analyze_full(d: Path, base: str | Path | None, top_k: Sequence[int], subspace: bool,
                  stack: ExitStack) -> dict[str, Any]:
    """A full fine-tuning run: dense svdvals of W_ft - W0 for every 2-D linear weight."""
    tuned_files = _weight_files(d, tuned=True)
    base_ref = base if base is not None else _recorded_base(d)
    if base_ref is None:
        raise MultiLoRAError(
            f"{d} is a full fine-tuning run but records no base model: pass --base MODEL "
            "(a model folder, a .safetensors file or 'smollm2-135m')"
        )
    tuned = _open_all(tuned_files, stack)
    base_sd = _open_all(_weight_files(_resolve_model(base_ref), tuned=False), stack)
    keys = [k for k in tuned if _is_linear_weight(k, tuned[k])]
    common = [k for k in keys if k in base_sd]
    if not common:
        raise MultiLoRAError(
            f"no weight of {d} matches a weight of the base model {base_ref} by name "
            f"(e.g. {keys[0] if keys else 'none'!r}): pass the base model this run was trained from with --base"
        )
    layers = []
    for key in common:
        w_ft, w0 = tuned[key].get_tensor(key), base_sd[key].get_tensor(key)
        if w_ft.shape != w0.shape:
            raise MultiLoRAError(f"weight {key!r} is {tuple(w_ft.shape)} in {d} but {tuple(w0.shape)} in the base "
                                 f"model {base_ref}: pass the base model this run was trained from with --base")
        _check_finite(w_ft, f"weight {key!r} in {d}")
        dw = w_ft.float() - w0.float()  # (d_out, d_in); (d_in, d_out) for GPT-2 Conv1D: same spectrum
        path, (d_out, d_in) = key.removesuffix(".weight"), dw.shape
        if subspace:
            u, sigma, vh = torch.linalg.svd(dw, full_matrices=False)  # (d_out, m), (m,), (m, d_in)
            rec = _layer_record(path, sigma, d_out, d_in, min(d_out, d_in), top_k)
            rec.update(subspace_metrics(u, sigma, vh, w0, max(top_k)))
        else:
            rec = _layer_record(path, dense_svdvals(dw), d_out, d_in, min(d_out, d_in), top_k)  # (min(d_out, d_in),)
        layers.append(rec)
    return {"kind": "full", "n": None, "r": None, "alpha": None, "scale": None,
            "base_model": str(base_ref), "layers": layers}


def _low_rank_record(path: str, B: torch.Tensor, A: torch.Tensor, rank_bound: int, top_k: Sequence[int],
                     w0: torch.Tensor | None) -> dict[str, Any]:
    """Layer entry of dW = B A (B (d_out, k), A (k, d_in)) by the QR route; with W0, its subspace metrics too."""
    if w0 is None:
        return _layer_record(path, lowrank_svdvals(B, A), B.shape[0], A.shape[1], rank_bound, top_k)
    u, sigma, vh = lowrank_svdvals(B, A, vectors=True)  # (d_out, m), (m,), (m, d_in)
    rec = _layer_record(path, sigma, B.shape[0], A.shape[1], rank_bound, top_k)
    rec.update(subspace_metrics(u, sigma, vh, w0, max(top_k)))
    return rec


def _base_weights(ref: str | Path | None, d: Path, stack: ExitStack) -> Any:
    """A lookup (module path, d_out, d_in, fan_in_fan_out) -> W0 (d_out, d_in) into the base model's weights."""
    if not ref:
        raise MultiLoRAError(f"{d} records no base model, which the subspace analysis needs: pass --base MODEL")
    handles = _open_all(_weight_files(_resolve_model(ref), tuned=False), stack)

    def w0_of(path: str, d_out: int, d_in: int, fan_in_fan_out: bool) -> torch.Tensor:
        """W0 (d_out, d_in) of the module at `path`."""
        key = f"{path}.weight"
        if key not in handles:
            raise MultiLoRAError(
                f"the base model {ref} has no weight {key!r}: pass the base model {d} was trained on with --base")
        w = handles[key].get_tensor(key)
        w = w.T if fan_in_fan_out else w  # Conv1D stores (d_in, d_out)
        if tuple(w.shape) != (d_out, d_in):
            raise MultiLoRAError(f"base weight {key!r} is {tuple(w.shape)} but the adapter needs {(d_out, d_in)}: "
                                 f"pass the base model {d} was trained on with --base")
        return w

    return w0_of


def subspace_metrics(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, w0: torch.Tensor,
                     k: int) -> dict[str, Any]:
    """How dW's top-k singular directions relate to W0 (LoRA paper, section 7).

    w0_overlap    ||U_k^T U0_k||_F^2 / k in [0, 1]: how much of dW's top-k left subspace lies in
                  W0's top-k one (w0_overlap_chance = k / d_out is the value for random subspaces)
    amplification ||dW||_F / ||U_k^T W0 V_k||_F: > 1 means dW amplifies directions W0 does not emphasize
    """
    nan = float("nan")
    rank = int((sigma > sigma[0] * max(w0.shape) * _EPS32).sum()) if sigma.numel() and sigma[0] > 0 else 0
    k = min(k, rank)
    if k == 0:
        return {"subspace_k": 0, "w0_overlap": nan, "w0_overlap_chance": nan, "amplification": nan}
    w0 = w0.detach().to(torch.float64)  # (d_out, d_in)
    u_k, v_k = u[:, :k].to(torch.float64), vh[:k].T.to(torch.float64)  # (d_out, k), (d_in, k)
    u0 = torch.linalg.svd(w0, full_matrices=False)[0][:, :k]  # (d_out, k)
    overlap = float((u_k.T @ u0).pow(2).sum()) / k
    projected = float((u_k.T @ w0 @ v_k).norm())  # ||U_k^T W0 V_k||_F, (k, k) inside
    fro = float(sigma.to(torch.float64).pow(2).sum().sqrt())
    return {"subspace_k": k, "w0_overlap": overlap, "w0_overlap_chance": k / w0.shape[0],
            "amplification": fro / projected if projected > 0 else float("inf")}


def _is_linear_weight(key: str, handle: Any) -> bool:
    """True for a 2-D `.weight` that is not an embedding or the output head."""
    if not key.endswith(".weight"):
        return False
    leaf = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return not any(part in leaf for part in _NOT_LINEAR) and len(handle.get_slice(key).get_shape()) == 2


def _weight_files(ref: Path, tuned: bool) -> list[Path]:
    """The safetensors files of a model folder (single or sharded) or a single .safetensors file."""
    if ref.is_file():
        return [ref]
    names = ("model.safetensors", "adapter.safetensors") if tuned else ("model.safetensors",)
    for name in names:
        if (ref / name).is_file():
            return [ref / name]
    index = ref / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MultiLoRAError(f"{index} is not a valid safetensors index ({e!r})") from None
        return [ref / f for f in sorted(set(weight_map.values()))]
    raise MultiLoRAError(
        f"{ref} holds no model.safetensors (or sharded index): pass a model folder written by save_pretrained")


def _open_all(files: list[Path], stack: ExitStack) -> dict[str, Any]:
    """Open safetensors files lazily: key -> the open handle that holds it."""
    from safetensors import safe_open

    handles = {}
    for f in files:
        if not f.is_file():
            raise MultiLoRAError(f"{f} is missing (named by the safetensors index)")
        try:
            h = stack.enter_context(safe_open(str(f), framework="pt"))
        except Exception as e:  # safetensors raises several types for a bad file
            raise MultiLoRAError(f"{f} is not a readable safetensors file ({e})") from None
        handles.update({k: h for k in h.keys()})
    return handles


def _run_config(d: Path) -> dict[str, Any]:
    """The trainer's resolved config.yaml of a run folder as a dict ({} if there is none)."""
    cfg = d / "config.yaml"
    if not cfg.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise MultiLoRAError(f"{cfg} is not valid YAML ({detail}); fix it or pass --base MODEL") from None
    return data if isinstance(data, dict) else {}


def _recorded_base(d: Path) -> str | None:
    """The base model a full run records: config.yaml `model`/`base_model`, else a json `_name_or_path`."""
    data = _run_config(d)
    for key in ("base_model", "model"):
        v = data.get(key)
        if isinstance(v, dict):
            v = v.get("name_or_path") or v.get("name") or v.get("path")
        if isinstance(v, str) and v:
            return v
    for name in ("full_model.json", "adapter_config.json", "config.json"):
        f = d / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(data, dict):
                continue
            v = data.get("base_model")
            v = v.get("name_or_path") if isinstance(v, dict) else v
            v = v or data.get("base_model_name_or_path") or data.get("_name_or_path")
            if isinstance(v, str) and v and Path(v).resolve() != d.resolve():
                return v
    return None


def _resolve_model(ref: str | Path) -> Path:
    """A base-model reference -> a folder or .safetensors file ('smollm2-135m' -> the embedded model's cache)."""
    from .models import DEFAULT_MODEL, embedded_model_path

    if str(ref) == DEFAULT_MODEL:
        return embedded_model_path()
    p = Path(ref).expanduser()
    if not p.exists():
        raise MultiLoRAError(f"base model {ref!r} is not a local folder or .safetensors file (this tool never "
                             "downloads): "
                             "pass --base PATH to the model the run was trained from")
    return p


# --- aggregation -------------------------------------------------------------------------------


def scalar_metrics(top_k: Sequence[int] = TOP_K) -> list[str]:
    """The per-layer numbers that are averaged and written to the CSV."""
    return ["frobenius", "sigma_max", "nuclear", "numerical_rank", "entropy", "effective_rank", "stable_rank",
            *(f"energy_top{k}" for k in top_k)]


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values (None, NaN and inf skipped); NaN if there are none."""
    good = [v for v in values if v is not None and math.isfinite(v)]
    return sum(good) / len(good) if good else float("nan")


def aggregate(layers: list[dict[str, Any]], by: str | None, top_k: Sequence[int] = TOP_K) -> dict[str, dict[str, Any]]:
    """Mean of each metric (NaN-skipping) over layers grouped by `by` ('type', 'depth' or None for all).

    Each group also holds `layers` (count) and `spectrum_mean`: the mean normalized spectrum,
    shorter spectra padded with zeros.
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for rec in layers:
        groups.setdefault("all" if by is None else rec[by], []).append(rec)
    key = (lambda g: (TYPE_ORDER.index(g) if g in TYPE_ORDER else len(TYPE_ORDER), g)) if by == "type" else \
          (lambda g: (-1 if g is None else g) if by == "depth" else 0)
    out = {}
    for g in sorted(groups, key=key):
        recs = groups[g]
        agg: dict[str, Any] = {"layers": len(recs)}
        agg.update({m: _nanmean([rec[m] for rec in recs]) for m in scalar_metrics(top_k)})
        present = [m for m in SUBSPACE_METRICS if any(m in rec for rec in recs)]
        agg.update({m: _nanmean([rec.get(m) for rec in recs]) for m in present})
        length = max(len(rec["spectrum"]) for rec in recs)
        spec = torch.zeros(length, dtype=torch.float64)
        for rec in recs:
            spec[: len(rec["spectrum"])] += torch.tensor(rec["spectrum"], dtype=torch.float64)
        agg["spectrum_mean"] = (spec / len(recs)).tolist()
        shares = [rec["module_share"] for rec in recs if "module_share" in rec]
        if shares:
            agg["module_share_mean"] = [_nanmean(list(col)) for col in zip(*shares)]
        out[str(g)] = agg
    return out


# --- outputs -----------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def csv_text(runs: list[dict[str, Any]], top_k: Sequence[int] = TOP_K) -> str:
    """One CSV row per run x layer with every scalar metric (lists joined with ';')."""
    cols = ["run", "kind", "module", "type", "depth", "d_out", "d_in", "rank_bound", *scalar_metrics(top_k),
            *SUBSPACE_METRICS, "scale_norms", "module_share", "note"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for run in runs:
        for rec in run["layers"]:
            row = {**rec, "run": run["name"], "kind": run["kind"]}
            for k in ("scale_norms", "module_share"):
                row[k] = ";".join(f"{v:.6g}" for v in rec[k]) if k in rec else ""
            w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return buf.getvalue()


def analyze(runs: Sequence[str | Path], out_dir: str | Path, base: str | Path | None = None,
            names: Sequence[str] | None = None, top_k: Sequence[int] = TOP_K, plots: bool = True,
            subspace: bool = False) -> dict[str, Any]:
    """Analyse several runs and write analysis.json, analysis.csv, the PNG plots and summary.md to `out_dir`."""
    if not runs:
        raise MultiLoRAError("analyze needs at least one run folder")
    top_k = tuple(sorted(set(int(k) for k in top_k)))
    if not top_k or top_k[0] < 1:
        raise MultiLoRAError(f"top-k values must be integers >= 1, got {top_k!r}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise MultiLoRAError(f"--out {out_dir} is a file; pass a folder for the analysis outputs")
    if names is not None and len(names) != len(runs):
        raise MultiLoRAError(f"--names gives {len(names)} names for {len(runs)} runs; give one name per run")
    names = list(names) if names is not None else _default_names(runs)
    if not all(isinstance(nm, str) and nm for nm in names):
        raise MultiLoRAError(f"run names must be non-empty, got {names}; pass --names a,b,c with one name per run")
    if len(set(names)) != len(names):
        raise MultiLoRAError(f"run names must be unique, got {names}; pass distinct --names")
    from .io import check_writable_dir

    check_writable_dir(out_dir, "--out folder")  # now, not after the analysis
    results = [analyze_run(p, base=base, name=nm, top_k=top_k, subspace=subspace) for p, nm in zip(runs, names)]
    out = Path(out_dir)
    report = {"version": ANALYSIS_VERSION, "top_k": list(top_k), "runs": results}
    write_json_atomic(out / "analysis.json", _clean(report))
    write_text_atomic(out / "analysis.csv", csv_text(results, top_k))
    figures = write_plots(results, out, top_k) if plots else []
    write_text_atomic(out / "summary.md", summary_markdown(results, figures, top_k))
    return report


def _default_names(runs: Sequence[str | Path]) -> list[str]:
    """Folder names, made unique with a -2, -3 suffix."""
    names, seen = [], {}
    for p in runs:
        nm = Path(p).resolve().name or str(p)
        seen[nm] = seen.get(nm, 0) + 1
        names.append(nm if seen[nm] == 1 else f"{nm}-{seen[nm]}")
    return names


def _fmt(x: Any, digits: int = 3) -> str:
    """A number for tables and bar labels, 'n/a' for None / NaN / inf."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_markdown(runs: list[dict[str, Any]], figures: list[tuple[str, str]], top_k: Sequence[int] = TOP_K) -> str:
    """summary.md: a table of the mean metrics per run, effective rank per module type, the plots."""
    ek = [f"energy_top{k}" for k in top_k]
    lines = ["# Spectra of the learned updates dW", "",
             "Means over the adapted layers. Energy top-k: share of ||dW||_F^2 in the k largest singular "
             "directions (higher = dominated by few directions). Effective rank: exp(entropy of sigma / sum sigma) "
             "(higher = flatter spectrum). Stable rank: ||dW||_F^2 / sigma_1^2.", "",
             "| run | kind | layers | rank bound | " + " | ".join(f"energy top-{k}" for k in top_k)
             + " | effective rank | stable rank | ‖dW‖_F |",
             "|---|---|---|---|" + "---|" * (len(top_k) + 3)]
    for run in runs:
        o = run["overall"]
        bounds = sorted({rec["rank_bound"] for rec in run["layers"]})
        bound = str(bounds[0]) if len(bounds) == 1 else f"{bounds[0]}-{bounds[-1]}"
        lines.append(f"| {run['name']} | {run['kind']} | {o['layers']} | {bound} | "
                     + " | ".join(_fmt(o[k]) for k in ek)
                     + f" | {_fmt(o['effective_rank'])} | {_fmt(o['stable_rank'])} | {_fmt(o['frobenius'])} |")
    types = [t for t in TYPE_ORDER if any(t in r["by_type"] for r in runs)]
    types += sorted({t for r in runs for t in r["by_type"]} - set(types))
    lines += ["", "Effective rank by module type (mean over layers):", "",
              "| run | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for run in runs:
        lines.append(f"| {run['name']} | " + " | ".join(
            _fmt(run["by_type"][t]["effective_rank"]) if t in run["by_type"] else "" for t in types) + " |")
    sub = [r for r in runs if "w0_overlap" in r["overall"]]
    if sub:
        lines += ["", "dW's top singular directions against W0's (LoRA paper, section 7): overlap "
                  "||U_k^T U0_k||_F^2 / k (chance level k / d_out), amplification ||dW||_F / ||U_k^T W0 V_k||_F.", "",
                  "| run | k | overlap with W0 | chance level | amplification |", "|---|---|---|---|---|"]
        for run in sub:
            o = run["overall"]
            lines.append(f"| {run['name']} | {_fmt(o['subspace_k'])} | {_fmt(o['w0_overlap'])} | "
                         f"{_fmt(o['w0_overlap_chance'])} | {_fmt(o['amplification'])} |")
    zero = sum(1 for r in runs for rec in r["layers"] if rec["note"])
    if zero:
        lines += ["", f"Note: {zero} layer(s) have dW = 0 (e.g. untrained); their ratios are n/a and excluded "
                  "from the means."]
    lines += ["", "Files: `analysis.json` (every number, per layer and aggregated), `analysis.csv` "
              "(one row per run x layer)."]
    for file, caption in figures:
        lines += ["", f"## {caption}", "", f"![{caption}]({file})"]
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------


def write_plots(runs: list[dict[str, Any]], out: Path, top_k: Sequence[int] = TOP_K) -> list[tuple[str, str]]:
    """Write the PNG plots (headless: matplotlib's Figure API, no pyplot); returns (file, caption) pairs."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise MultiLoRAError("the analysis plots need matplotlib: pip install matplotlib") from None
    figures = [("spectra.png", "Normalized singular-value spectra per module type", _plot_spectra(runs)),
               ("effective_rank_by_depth.png", "Effective rank by layer depth", _plot_depth(runs)),
               ("energy_share.png", "Top-k energy share", _plot_energy(runs, top_k))]
    scaled = [r for r in runs if any("module_share" in rec for rec in r["layers"])]
    if scaled:
        figures.append(("multilora_scales.png", "MultiLoRA: each module's share of dW and the scale norms",
                        _plot_scales(scaled)))
    for file, _, fig in figures:
        with atomic_path(out / file) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return [(file, caption) for file, caption, _ in figures]


def _colors(n: int) -> list[Any]:
    """n distinct colors (tab10, cycled), the same run order in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _plot_spectra(runs: list[dict[str, Any]]) -> Any:
    """(1) Mean normalized spectrum sigma_j / sum sigma per module type, runs overlaid, log-y."""
    from matplotlib.figure import Figure

    types = [t for t in TYPE_ORDER if any(t in r["by_type"] for r in runs)]
    types += sorted({t for r in runs for t in r["by_type"]} - set(types))
    cols = min(4, len(types))
    rows = math.ceil(len(types) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    longest = max(len(g["spectrum_mean"]) for r in runs for g in r["by_type"].values())
    for ax, t in zip(axes.flat, types):
        drawn = False
        for run, color in zip(runs, _colors(len(runs))):
            if t not in run["by_type"]:
                continue
            g = run["by_type"][t]
            spec = [p for p in g["spectrum_mean"] if p > 0]
            if not spec:
                continue
            x = range(1, len(spec) + 1)
            ax.plot(x, spec, marker="o" if len(spec) <= 32 else None, ms=3, color=color, label=run["name"])
            drawn = True
        if drawn:
            ax.set_yscale("log")
            if longest > 64:
                ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "dW = 0 in every layer\n(untrained?)", ha="center", va="center", transform=ax.transAxes)
        counts = ", ".join(f"{r['name']}: {r['by_type'][t]['layers']}" for r in runs if t in r["by_type"])
        ax.set_title(f"{t}  (layers {counts})", fontsize=9)
        ax.set_xlabel("singular value index j")
        ax.set_ylabel(r"$\sigma_j / \Sigma\sigma$ (fraction)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.suptitle("Normalized singular-value spectrum of dW (mean over the layers of each module type; log scale)")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _plot_depth(runs: list[dict[str, Any]]) -> Any:
    """(2) Effective rank (mean over the module types at each depth) against the layer index, per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for run, color in zip(runs, _colors(len(runs))):
        pts = [(int(d), g["effective_rank"]) for d, g in run["by_depth"].items()
               if d != "None" and math.isfinite(g["effective_rank"])]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", ms=4, color=color, label=run["name"])
    ax.set_title("Effective rank of dW by layer depth (mean over module types)")
    ax.set_xlabel("layer index (depth)")
    ax.set_ylabel(r"effective rank $e^{H(\sigma/\Sigma\sigma)}$ (directions)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_energy(runs: list[dict[str, Any]], top_k: Sequence[int]) -> Any:
    """(3) Grouped bars: mean top-k energy share per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(7.0, 1.6 * len(runs) + 2), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(top_k)
    for i, (k, color) in enumerate(zip(top_k, _colors(len(top_k)))):
        vals = [run["overall"][f"energy_top{k}"] for run in runs]
        xs = [j + (i - (len(top_k) - 1) / 2) * width for j in range(len(runs))]
        bars = ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in vals], width, color=color, label=f"top-{k}")
        ax.bar_label(bars, labels=[_fmt(v, 2) for v in vals], fontsize=7)
    long_names = any(len(run["name"]) > 10 for run in runs)
    ax.set_xticks(range(len(runs)), [run["name"] for run in runs], rotation=20 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_ylim(0, 1.1)
    ax.set_title(r"Share of $\|dW\|_F^2$ in the top-k singular directions (mean over layers)")
    ax.set_xlabel("run")
    ax.set_ylabel(r"energy share $\Sigma_{j\leq k}\sigma_j^2 / \Sigma_j\sigma_j^2$ (fraction)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_scales(runs: list[dict[str, Any]]) -> Any:
    """(4) Per MultiLoRA run: stacked module shares of ||dW_i||_F per module type, and ||s_i|| by depth."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8 * len(runs)))
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (ax_share, ax_norm), run in zip(axes, runs):
        types = [t for t, g in run["by_type"].items() if "module_share_mean" in g]
        n = len(run["by_type"][types[0]]["module_share_mean"]) if types else 0
        bottom = [0.0] * len(types)
        for i, color in zip(range(n), _colors(n)):
            vals = [run["by_type"][t]["module_share_mean"][i] for t in types]
            vals = [v if math.isfinite(v) else 0.0 for v in vals]
            ax_share.bar(types, vals, 0.6, bottom=bottom, color=color, label=f"module {i + 1}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax_share.axhline(1 / max(n, 1), color="gray", ls="--", lw=1, label="equal share 1/n")
        ax_share.set_ylim(0, 1.05)
        ax_share.set_title(f"{run['name']}: " + r"module i's share $\|s_i B_i A_i\|_F / \Sigma_i \|s_i B_i A_i\|_F$",
                           fontsize=10)
        ax_share.set_xlabel("module type")
        ax_share.set_ylabel("share of the summed norms (fraction)")
        ax_share.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        norms = [rec for rec in run["layers"] if "scale_norms" in rec]
        if norms:
            by_depth: dict[int, list[list[float]]] = {}
            for rec in norms:
                by_depth.setdefault(rec["depth"] if rec["depth"] is not None else -1, []).append(rec["scale_norms"])
            depths = sorted(by_depth)
            for i, color in zip(range(n), _colors(n)):
                ax_norm.plot(depths, [_nanmean([v[i] for v in by_depth[d]]) for d in depths], marker="o", ms=4,
                             color=color, label=f"module {i + 1}")
            ax_norm.set_title(f"{run['name']}: " + r"scale norm $\|s_i\|_2$ by depth (mean over module types)",
                              fontsize=10)
            ax_norm.legend(fontsize=7)
        else:
            ax_norm.text(0.5, 0.5, "no learned scales (scale='none')", ha="center", va="center",
                         transform=ax_norm.transAxes)
            ax_norm.set_title(f"{run['name']}: scale norms")
        ax_norm.set_xlabel("layer index (depth)")
        ax_norm.set_ylabel(r"$\|s_i\|_2$ (unitless)")
        ax_norm.set_ylim(bottom=0)
        ax_norm.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# --- CLI -------------------------------------------------------------------------------------------


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `multilora analyze` arguments to `p`."""
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folder, multilora adapter folder, PEFT LoRA adapter folder or full fine-tuning run")
    p.add_argument("--out", required=True, help="output folder for analysis.json, analysis.csv, PNGs and summary.md")
    p.add_argument("--base", default=None,
                   help="base model of full fine-tuning runs (folder, .safetensors file or 'smollm2-135m'); "
                   "default: the one the run records")
    p.add_argument("--names", default=None, help="comma-separated display names, one per RUN (default: folder names)")
    p.add_argument("--top-k", default=",".join(map(str, TOP_K)),
                   help=f"comma-separated k for the top-k energy share (default: {','.join(map(str, TOP_K))})")
    p.add_argument("--subspace", action="store_true",
                   help="also compare dW's top singular directions with W0's (needs the base weights; "
                   "a dense SVD of every W0: slow on large models)")


def run_analyze_cli(args: argparse.Namespace) -> None:
    """Run `multilora analyze` from parsed arguments and print a one-line-per-run summary."""
    names = [s.strip() for s in args.names.split(",")] if args.names else None
    try:
        top_k = [int(s) for s in str(args.top_k).split(",") if s.strip()]
    except ValueError:
        raise MultiLoRAError(f"--top-k must be comma-separated integers, got {args.top_k!r}") from None
    report = analyze(args.runs, args.out, base=args.base, names=names, top_k=top_k, subspace=args.subspace)
    k = report["top_k"][0]
    for run in report["runs"]:
        o = run["overall"]
        print(f"{run['name']:>16}  {run['kind']:<10} {o['layers']:4d} layers  "
              f"energy top-{k} {_fmt(o[f'energy_top{k}'])}  "
              f"effective rank {_fmt(o['effective_rank'])}  stable rank {_fmt(o['stable_rank'])}")
    print(f"wrote analysis.json, analysis.csv, plots and summary.md to {args.out}")
