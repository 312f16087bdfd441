"""The report's tables and its verdict on the paper's claims, from hand-made numbers and per-item results."""

from __future__ import annotations

import math

import matplotlib
import numpy as np

from multilora.report import task_table, write_report
from multilora.report_plots import loss_curves_png
from multilora.verdict import comparisons, spectrum_comparisons, verdict
from multilora.stats import paired_bootstrap

MODULES = 8


def mc_items(task: str, correct: list[bool]) -> list[dict]:
    """Per-item scores of a 2-choice task (gold 0): item i answered right when correct[i]."""
    return [{"id": f"{task}-{i}", "task": task, "group": i, "gold": 0, "ll": [-1.0, -2.0] if ok else [-2.0, -1.0],
             "ll_norm": [-1.0, -2.0] if ok else [-2.0, -1.0], "n_tokens": [1, 1], "pred": 0 if ok else 1,
             "pred_norm": 0 if ok else 1} for i, ok in enumerate(correct)]


def result(acc: dict[str, float | list[bool]], ppl: float = 10.0, n: int = 400) -> dict:
    """An evaluate() result with items: an accuracy gets its first round(acc * n) items right (so a higher
    accuracy answers a superset of a lower one's items), or an explicit list of right/wrong per item."""
    tasks = {}
    for t, a in acc.items():
        correct = a if isinstance(a, list) else [i < round(a * n) for i in range(n)]
        tasks[t] = {"kind": "choice", "acc": sum(correct) / len(correct), "chance": 0.5, "n": len(correct),
                    "items": mc_items(t, correct)}
    tasks["alpaca"] = {"kind": "perplexity", "perplexity": ppl, "chance": 49152, "n": 16,
                       "items": [{"id": f"a{i}", "nll": 10 * math.log(ppl), "tokens": 10} for i in range(16)]}
    return {"tasks": tasks}


def spectrum_run(name: str, eff: float, top1: float) -> dict:
    layers = [{"module": f"layers.{i // 4}.q{i % 4}", "effective_rank": eff + 0.1 * (i % 3),
               "energy_top1": top1 + 0.01 * (i % 3 - 1)} for i in range(MODULES)]
    return {"name": name, "layers": layers, "overall": {"effective_rank": eff + 0.1, "energy_top1": top1,
                                                        "energy_top8": 0.9, "stable_rank": 2.0, "rank_bound": 24}}


def study(ml_acc: float, lora_acc: float, full_acc: float, ml_top1: float, lora_top1: float, n: int = 400) -> dict:
    return {
        "eval_tasks": ["rte", "alpaca"], "seeds": [0],
        "evals": {"base": [result({"rte": 0.5}, 12.0, n)], "lora": [result({"rte": lora_acc}, 9.0, n)],
                  "multilora": [result({"rte": ml_acc}, 9.5, n)], "full": [result({"rte": full_acc}, 8.0, n)]},
        "analysis": {"top_k": [1, 8], "runs": [spectrum_run("lora", 8.0, lora_top1),
                                                spectrum_run("multilora", 20.0, ml_top1),
                                                spectrum_run("full", 30.0, 0.2)]},
    }


def test_verdict_supports_both_claims_when_the_numbers_do():
    text = verdict(study(ml_acc=0.80, lora_acc=0.60, full_acc=0.62, ml_top1=0.15, lora_top1=0.7))
    assert "Claim 1, a flatter spectrum: supported" in text and "closer to full fine-tuning" in text
    assert "Claim 2, better multi-task scores: supported" in text
    assert "base model scores 50.0%; the best fine-tuned model (multilora) gains over it (+30.0 points)" in text


def test_verdict_rejects_claims_the_numbers_do_not_support():
    text = verdict(study(ml_acc=0.55, lora_acc=0.60, full_acc=0.62, ml_top1=0.8, lora_top1=0.7))
    assert "Claim 1, a flatter spectrum: not supported" in text
    assert "Claim 2, better multi-task scores: not supported" in text


def test_verdict_calls_small_differences_noise():
    # 0.62 vs 0.60 on 40 items: one discordant item, so the paired interval includes zero: can't tell
    # (this replaced the old "within two standard errors" rule and its "not supported")
    text = verdict(study(ml_acc=0.62, lora_acc=0.60, full_acc=0.61, ml_top1=0.1, lora_top1=0.7, n=40))
    assert "Claim 2, better multi-task scores: can't tell here" in text
    assert "supported" not in text.split("Claim 2")[1]


def test_verdict_per_task_from_paired_intervals_a_win_a_loss_and_a_tie(tmp_path):
    """MultiLoRA vs LoRA on 200 items each: RTE a clear win (60 items only MultiLoRA gets right), BoolQ a clear
    loss (60 only LoRA gets), WiC a tie (20 discordant items each way, same accuracy): better / worse /
    can't tell, decided by the interval; the overall mean of the three can't tell."""
    n = 200
    lora = {"rte": [i < 80 for i in range(n)], "boolq": [i < 140 for i in range(n)], "wic": [i < 100 for i in range(n)]}
    ml = {"rte": [i < 140 for i in range(n)], "boolq": [i < 80 for i in range(n)],
          "wic": [(i < 80) or (100 <= i < 120) for i in range(n)]}  # 80..99 lost, 100..119 won: same accuracy
    s = {"eval_tasks": ["rte", "boolq", "wic", "alpaca"], "seeds": [0],
         "evals": {"lora": [result(lora, 9.0)], "multilora": [result(ml, 9.0)]},
         "analysis": {"top_k": [1, 8], "runs": [spectrum_run("lora", 8.0, 0.7), spectrum_run("multilora", 20.0, 0.15)]}}
    rows = {(r["task"], r["baseline"]): r for r in comparisons(s, n_boot=2000) if r["run"] == "multilora"}
    assert rows[("rte", "lora")]["verdict"] == "better" and rows[("boolq", "lora")]["verdict"] == "worse"
    assert rows[("wic", "lora")]["verdict"] == "can't tell" and rows[("wic", "lora")]["diff"] == 0.0
    assert rows[("alpaca", "lora")]["verdict"] == "can't tell"  # the same perplexity on every example
    assert rows[("overall", "lora")]["verdict"] == "can't tell"  # +30, -30, 0 points: mean 0
    # the differences are the items' own: MultiLoRA - LoRA accuracy, with an interval from stats around it
    assert math.isclose(rows[("rte", "lora")]["diff"], 0.30) and math.isclose(rows[("boolq", "lora")]["diff"], -0.30)
    iv = paired_bootstrap(np.array(lora["rte"], float), np.array(ml["rte"], float), n_boot=2000, seed=0)
    assert math.isclose(iv.diff, rows[("rte", "lora")]["diff"]) and 0.2 < iv.low < 0.3 < iv.high < 0.4
    text = verdict(s)
    assert "Claim 2, better multi-task scores: can't tell here" in text
    assert "per task better on rte; worse on boolq; can't tell on wic, alpaca (nll/token)" in text
    s.update(model="m", tasks=["rte", "boolq", "wic", "alpaca"], steps=4, batch_size=4, max_len=64,
             mixture="proportional", eval_limit=200, mmlu_per_subject=10,
             data_sizes={"rte": {"train": 10, "eval": 200}},
             timings={"train": 1.0, "eval": 1.0, "analyze": 1.0, "total": 3.0}, precision="bf16",
             methods={m: {"trainable": 10, "share": 0.1, "seconds": [1.0], "lr": 1e-3, "train_loss": [[2.0, 1.0]]}
                      for m in ("lora", "multilora")})
    report = write_report(s, tmp_path).read_text()
    table = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in report.splitlines()
             if line.startswith("| multilora − lora")}
    rte = table[("multilora − lora", "rte", "acc")]
    assert "+30.0 pp [" in rte and "| better |" in rte
    assert "| worse |" in table[("multilora − lora", "boolq", "acc")]
    assert "| can't tell |" in table[("multilora − lora", "wic", "acc")]
    assert "| better |" in table[("multilora − lora", "spectrum", "effective_rank")]
    assert "Training precision: bf16 autocast" in report
    assert (tmp_path / "forest-vs-lora.png").read_bytes()[:4] == b"\x89PNG"


def test_spectrum_interval_spans_modules_and_seeds():
    """The spectrum rows pair modules (and seeds): the difference is the mean over both, its interval from
    stats.paired_bootstrap over the (seeds, modules) matrices; one seed says seed variation is not in it."""
    rng = np.random.default_rng(0)
    mods = [f"m{i}" for i in range(6)]
    spectra = {name: [{m: {"effective_rank": float(base + rng.normal()),
                           "energy_top1": float(top + 0.01 * rng.normal())} for m in mods} for _ in range(3)]
               for name, base, top in (("lora", 10.0, 0.6), ("multilora", 10.2, 0.59), ("full", 30.0, 0.2))}
    s = {"seeds": [0, 1, 2], "evals": {"lora": [], "multilora": []}, "spectra": spectra}
    rows = {r["metric"]: r for r in spectrum_comparisons(s, n_boot=2000)}
    a = np.array([[seed[m]["effective_rank"] for m in mods] for seed in spectra["lora"]])
    b = np.array([[seed[m]["effective_rank"] for m in mods] for seed in spectra["multilora"]])
    iv = paired_bootstrap(a, b, n_boot=2000, seed=0)
    r = rows["effective_rank"]
    assert math.isclose(r["diff"], float((b - a).mean())) and (r["low"], r["high"]) == (iv.low, iv.high)
    assert r["n_items"] == 6 and r["n_seeds"] == 3 and "6 adapted modules and 3 seeds" in r["note"]
    assert r["verdict"] == ("better" if iv.low > 0 else "worse" if iv.high < 0 else "can't tell")
    one = spectrum_comparisons({**s, "spectra": {k: v[:1] for k, v in spectra.items()}}, n_boot=500)
    assert "one seed" in one[0]["note"]


def test_task_table_marks_the_best_per_task_and_knows_lower_perplexity_is_better():
    table = task_table(study(ml_acc=0.80, lora_acc=0.60, full_acc=0.62, ml_top1=0.15, lora_top1=0.7))
    rte = next(line for line in table.splitlines() if line.startswith("| rte"))
    alpaca = next(line for line in table.splitlines() if line.startswith("| alpaca"))
    assert "**80.0**" in rte and rte.count("**") == 2
    assert "**8.00**" in alpaca and alpaca.count("**") == 2  # full has the lowest perplexity


def test_loss_trend_sentence_names_a_method_whose_loss_rose():
    s = study(ml_acc=0.62, lora_acc=0.60, full_acc=0.61, ml_top1=0.1, lora_top1=0.7)
    s["methods"] = {"lora": {"train_loss": [[2.0, 2.0, 1.0, 1.0]]}, "multilora": {"train_loss": [[2.0, 2.0, 3.0, 3.0]]}}
    text = verdict(s)
    assert "lora 2.00 → 1.00, multilora 2.00 → 3.00" in text and "It rose for multilora" in text


def test_a_smoke_test_judges_no_claim():
    s = study(ml_acc=0.80, lora_acc=0.60, full_acc=0.62, ml_top1=0.15, lora_top1=0.7)  # numbers that would "support"
    s["smoke_test"] = True
    text = verdict(s)
    assert text.startswith("**Smoke test: no verdict") and "supported" not in text


def test_a_report_of_a_smoke_test_says_so_and_judges_no_claim(tmp_path):
    s = study(ml_acc=0.80, lora_acc=0.60, full_acc=0.62, ml_top1=0.15, lora_top1=0.7)
    s.update(smoke_test=True, model="tiny", tasks=["rte", "alpaca"], steps=4, batch_size=4, max_len=64,
             mixture="proportional", eval_limit=8, mmlu_per_subject=1, data_sizes={"rte": {"train": 10, "eval": 8}},
             timings={"train": 1.0, "eval": 1.0, "analyze": 1.0, "total": 3.0},
             methods={m: {"trainable": 10, "share": 0.1, "seconds": [1.0], "lr": 1e-3, "train_loss": [[2.0, 1.0]]}
                      for m in ("lora", "multilora", "full")})
    report = write_report(s, tmp_path).read_text()
    assert "Smoke test: no verdict" in report and "supported" not in report


def test_the_loss_plot_leaves_matplotlibs_backend_alone(tmp_path):
    """The plot draws with the Figure API: pyplot's global backend is the caller's business."""
    old = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        loss_curves_png({"methods": {"lora": {"train_loss": [[2.0, 1.5, 1.0]]}}}, tmp_path / "loss.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(old)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
