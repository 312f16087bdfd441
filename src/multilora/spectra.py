"""Singular-value spectra of weight updates dW and their metrics (docs/method.md §5): the math of `analyze`.

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

`layer_record` is one layer's entry in an analysis; `aggregate` averages them per module type,
depth or overall. Reading runs and writing the outputs is `analyze`'s job.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import torch

from .errors import MultiLoRAError

TOP_K = (1, 4, 8)
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
_LEAF_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}
EPS32 = torch.finfo(torch.float32).eps
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
    dw = dw.detach().to(torch.float32)
    # the same values for dW^T; LAPACK takes a tall matrix faster (SmolLM2's down_proj 576 x 1536: 74 -> 40 ms)
    return torch.linalg.svdvals(dw if dw.shape[0] >= dw.shape[1] else dw.T)


def spectrum_metrics(sigma: torch.Tensor | Sequence[float], top_k: Iterable[int] = TOP_K,
                     rtol: float | None = None) -> dict[str, Any]:
    """Metrics of one spectrum (see the module docstring); NaN ratios and a `note` for a zero dW.

    `rtol` (relative to sigma_1) sets `numerical_rank`; default len(sigma) * float32 eps.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).flatten().clamp_min(0.0).sort(descending=True).values
    m = s.numel()
    rtol = m * EPS32 if rtol is None else rtol
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


def subspace_metrics(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, w0: torch.Tensor,
                     k: int) -> dict[str, Any]:
    """How dW's top-k singular directions relate to W0 (LoRA paper, section 7).

    w0_overlap    ||U_k^T U0_k||_F^2 / k in [0, 1]: how much of dW's top-k left subspace lies in
                  W0's top-k one (w0_overlap_chance = k / d_out is the value for random subspaces)
    amplification ||dW||_F / ||U_k^T W0 V_k||_F: > 1 means dW amplifies directions W0 does not emphasize
    """
    nan = float("nan")
    rank = int((sigma > sigma[0] * max(w0.shape) * EPS32).sum()) if sigma.numel() and sigma[0] > 0 else 0
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


# --- one layer's record ------------------------------------------------------------------------


def module_type(path: str) -> str:
    """q, k, v, o, gate, up, down for the usual projection names, else the leaf name."""
    leaf = path.rsplit(".", 1)[-1]
    return _LEAF_TYPES.get(leaf, leaf)


def module_depth(path: str) -> int | None:
    """The layer index in a module path (`model.layers.3.mlp.up_proj` -> 3), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def layer_record(path: str, sigma: torch.Tensor, d_out: int, d_in: int, rank_bound: int,
                  top_k: Sequence[int]) -> dict[str, Any]:
    """One layer's entry in the analysis: identity, sizes, sigma and its metrics."""
    metrics = spectrum_metrics(sigma, top_k, rtol=max(d_out, d_in) * EPS32)
    spectrum = metrics.pop("spectrum")
    return {"module": path, "type": module_type(path), "depth": module_depth(path), "d_out": d_out,
            "d_in": d_in, "rank_bound": min(rank_bound, d_out, d_in), **metrics,
            "sigma": [float(x) for x in sigma.tolist()], "spectrum": spectrum}


def low_rank_record(path: str, B: torch.Tensor, A: torch.Tensor, rank_bound: int, top_k: Sequence[int],
                     w0: torch.Tensor | None) -> dict[str, Any]:
    """Layer entry of dW = B A (B (d_out, k), A (k, d_in)) by the QR route; with W0, its subspace metrics too."""
    if w0 is None:
        return layer_record(path, lowrank_svdvals(B, A), B.shape[0], A.shape[1], rank_bound, top_k)
    u, sigma, vh = lowrank_svdvals(B, A, vectors=True)  # (d_out, m), (m,), (m, d_in)
    rec = layer_record(path, sigma, B.shape[0], A.shape[1], rank_bound, top_k)
    rec.update(subspace_metrics(u, sigma, vh, w0, max(top_k)))
    return rec


# --- aggregation -------------------------------------------------------------------------------


def scalar_metrics(top_k: Sequence[int] = TOP_K) -> list[str]:
    """The per-layer numbers that are averaged and written to the CSV."""
    return ["frobenius", "sigma_max", "nuclear", "numerical_rank", "entropy", "effective_rank", "stable_rank",
            *(f"energy_top{k}" for k in top_k)]


def nanmean(values: list[float]) -> float:
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
        agg.update({m: nanmean([rec[m] for rec in recs]) for m in scalar_metrics(top_k)})
        present = [m for m in SUBSPACE_METRICS if any(m in rec for rec in recs)]
        agg.update({m: nanmean([rec.get(m) for rec in recs]) for m in present})
        length = max(len(rec["spectrum"]) for rec in recs)
        spec = torch.zeros(length, dtype=torch.float64)
        for rec in recs:
            spec[: len(rec["spectrum"])] += torch.tensor(rec["spectrum"], dtype=torch.float64)
        agg["spectrum_mean"] = (spec / len(recs)).tolist()
        shares = [rec["module_share"] for rec in recs if "module_share" in rec]
        if shares:
            agg["module_share_mean"] = [nanmean(list(col)) for col in zip(*shares)]
        out[str(g)] = agg
    return out
