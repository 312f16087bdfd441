"""The report's tables and its verdict on the paper's claims, from hand-made numbers."""

from __future__ import annotations

import matplotlib

from multilora.report import loss_curves_png, task_table, verdict, write_report


def result(acc: dict[str, float], ppl: float = 10.0, n: int = 400) -> dict:
    tasks = {t: {"kind": "choice", "acc": a, "chance": 0.5, "n": n} for t, a in acc.items()}
    tasks["alpaca"] = {"kind": "perplexity", "perplexity": ppl, "chance": 49152, "n": 16}
    return {"tasks": tasks}


def study(ml_acc: float, lora_acc: float, full_acc: float, ml_top1: float, lora_top1: float, n: int = 400) -> dict:
    def run(name, eff, top1):
        return {"name": name, "overall": {"effective_rank": eff, "energy_top1": top1, "energy_top8": 0.9,
                                          "stable_rank": 2.0, "rank_bound": 24}}

    return {
        "eval_tasks": ["rte", "alpaca"], "seeds": [0],
        "evals": {"base": [result({"rte": 0.5}, 12.0, n)], "lora": [result({"rte": lora_acc}, 9.0, n)],
                  "multilora": [result({"rte": ml_acc}, 9.5, n)], "full": [result({"rte": full_acc}, 8.0, n)]},
        "analysis": {"top_k": [1, 8], "runs": [run("lora", 8.0, lora_top1), run("multilora", 20.0, ml_top1),
                                                run("full", 30.0, 0.2)]},
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
    # 0.62 vs 0.60 on 40 items: a binomial standard error of ~0.077, so 2 points is noise
    text = verdict(study(ml_acc=0.62, lora_acc=0.60, full_acc=0.61, ml_top1=0.1, lora_top1=0.7, n=40))
    assert "not supported" in text.split("Claim 2")[1] and "within two standard errors" in text


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
