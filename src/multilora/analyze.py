"""`multilora analyze`: read runs and adapters, compute the spectra of their updates dW, write the outputs.

The math (exact QR-route spectra, metrics, aggregation) is in `spectra`, the text outputs in
`analysis_report`, the plots in `analysis_plots`; this module finds and reads the weights.

Inputs `analyze_run` understands (detected from the files in the folder):
    multilora adapter / run folder   adapter_config.json (format multilora-adapter) + adapter.safetensors
    PEFT LoRA adapter                adapter_config.json (peft_type LORA) + adapter_model.safetensors
    full fine-tuning run             model.safetensors (or model.safetensors.index.json + shards), as
                                     `multilora train` writes it (a save_pretrained folder +
                                     full_model.json), or adapter.safetensors with method "full" in
                                     config.yaml / adapter_config.json;
                                     the base weights come from `base=` (a model folder, a
                                     .safetensors file or 'smollm2-135m'), else from the base model
                                     recorded in the run (`Run.base_model`: config.yaml `model`, else
                                     full_model.json / adapter_config.json `base_model.name_or_path`;
                                     else config.json `_name_or_path`). Tensors are
                                     matched by their state-dict key; every 2-D `.weight` outside
                                     the embeddings and the output head is analysed.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from .analysis_plots import write_plots
from .analysis_report import csv_text, fmt, json_safe, summary_markdown
from .checkpoint import read_adapter
from .errors import MultiLoRAError
from .interop import PEFT_CONFIG_NAME, read_peft
from .io import check_writable_dir, read_json_object, write_json_atomic, write_text_atomic
from .layers import fuse
from .models import DEFAULT_MODEL, embedded_model_path
from .run import Run
from .spectra import (TOP_K, TYPE_ORDER, aggregate, dense_svdvals, layer_record, low_rank_record,
                      module_shares, subspace_metrics)

__all__ = ["analyze", "analyze_run", "detect_kind", "add_analyze_arguments", "run_analyze_cli"]

ANALYSIS_VERSION = 1
_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out")  # leaf-name parts skipped in full-FT state dicts
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


# --- reading runs ------------------------------------------------------------------------------


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
    if (d / "adapter.safetensors").is_file() and Run(d).saved_config().get("method") == "full":
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
    meta, tensors = read_adapter(d)
    n, r, scaling = meta["n"], meta["r"], meta["alpha"] / meta["r"]
    recorded = Run(d).base_model()
    w0_of = _base_weights(base or recorded, d, stack) if subspace else None
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
        rec = low_rank_record(path, b_s, a_cat, n * r, top_k, w0)
        if n > 1 or lora_s is not None:  # the MultiLoRA view: which modules carry dW, and the scales
            rec["module_fro"], rec["module_share"] = module_shares(a_cat, b_s, n)
        if lora_s is not None:
            rec["scale_norms"] = lora_s.double().reshape(n, -1).norm(dim=1).tolist()  # ||s_i||_2
        layers.append(rec)
    return {"kind": meta.get("method", "multilora"), "n": n, "r": r, "alpha": meta["alpha"],
            "scale": meta.get("scale"), "layers": layers,
            "base_model": str(base) if subspace and base else recorded}


def _analyze_peft(d: Path, top_k: Sequence[int], base: str | Path | None, subspace: bool,
                  stack: ExitStack) -> dict[str, Any]:
    """A PEFT LoRA adapter: dW = scaling * lora_B.weight @ lora_A.weight per module (interop reads and checks it)."""
    cfg = read_json_object(d / PEFT_CONFIG_NAME, fix="re-save the adapter")
    if cfg.get("peft_type") != "LORA":
        raise MultiLoRAError(
            f"{d} is a PEFT {cfg.get('peft_type')} adapter; only LoRA adapters (peft_type LORA) can be analysed")
    if cfg.get("use_dora"):
        raise MultiLoRAError(
            f"{d} is a DoRA adapter (use_dora: true), whose update is not B A; only plain LoRA can be analysed")
    adapter = read_peft(d, cfg)
    if not adapter.modules:
        raise MultiLoRAError(f"{adapter.weights} holds no lora_A/lora_B weights; is it a LoRA adapter?")
    recorded = Run(d).base_model()
    w0_of = _base_weights(base or recorded, d, stack) if subspace else None
    layers = []
    for path, f in adapter.modules.items():
        A, B = f.a, f.b  # (R, d_in), (d_out, R)
        w0 = w0_of(path, B.shape[0], A.shape[1], bool(cfg.get("fan_in_fan_out"))) if w0_of else None
        layers.append(low_rank_record(path, B.double() * f.scaling, A.double(), f.rank, top_k, w0))
    ranks = sorted({f.rank for f in adapter.modules.values()})
    return {"kind": "peft-lora", "n": 1, "r": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": cfg.get("lora_alpha"), "scale": None,
            "base_model": str(base) if subspace and base else recorded,
            "layers": layers}


def _check_finite(t: torch.Tensor | None, what: str) -> None:
    """Raise a MultiLoRAError if `t` holds NaN or inf (a corrupt file or a diverged run)."""
    if t is not None and not torch.isfinite(t).all():
        raise MultiLoRAError(f"{what} holds NaN or inf values: the run diverged or the file is corrupt; "
                             "analyse an earlier checkpoint")


def _analyze_full(d: Path, base: str | Path | None, top_k: Sequence[int], subspace: bool,
                  stack: ExitStack) -> dict[str, Any]:
    """A full fine-tuning run: dense svdvals of W_ft - W0 for every 2-D linear weight."""
    tuned_files = _weight_files(d, tuned=True)
    base_ref = base if base is not None else Run(d).base_model()
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
            rec = layer_record(path, sigma, d_out, d_in, min(d_out, d_in), top_k)
            rec.update(subspace_metrics(u, sigma, vh, w0, max(top_k)))
        else:
            rec = layer_record(path, dense_svdvals(dw), d_out, d_in, min(d_out, d_in), top_k)  # (min(d_out, d_in),)
        layers.append(rec)
    return {"kind": "full", "n": None, "r": None, "alpha": None, "scale": None,
            "base_model": str(base_ref), "layers": layers}


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


def _resolve_model(ref: str | Path) -> Path:
    """A base-model reference -> a folder or .safetensors file ('smollm2-135m' -> the embedded model's cache)."""
    if str(ref) == DEFAULT_MODEL:
        return embedded_model_path()
    p = Path(ref).expanduser()
    if not p.exists():
        raise MultiLoRAError(f"base model {ref!r} is not a local folder or .safetensors file (this tool never "
                             "downloads): "
                             "pass --base PATH to the model the run was trained from")
    return p


# --- outputs -----------------------------------------------------------------------------------


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
    check_writable_dir(out_dir, "--out folder")  # now, not after the analysis
    results = [analyze_run(p, base=base, name=nm, top_k=top_k, subspace=subspace) for p, nm in zip(runs, names)]
    out = Path(out_dir)
    report = {"version": ANALYSIS_VERSION, "top_k": list(top_k), "runs": results}
    write_json_atomic(out / "analysis.json", json_safe(report))
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
              f"energy top-{k} {fmt(o[f'energy_top{k}'])}  "
              f"effective rank {fmt(o['effective_rank'])}  stable rank {fmt(o['stable_rank'])}")
    print(f"wrote analysis.json, analysis.csv, plots and summary.md to {args.out}")
