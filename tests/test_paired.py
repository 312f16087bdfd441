"""paired: eval results matched item by item (ids, shared subsets, older results without ids), seed groups,
the rows of compare_paired against direct computations, mismatch errors, the forest plot; `multilora eval
--compare` on results the tool wrote (plain eval on a tiny model, a sweep's runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sp

from multilora.cli import main as cli_main
from multilora.errors import MultiLoRAError
from multilora.paired import compare_paired, forest_png, item_values, seed_groups
from multilora.stats import paired_bootstrap


def mc_items(correct: list[int], ids: list[str] | None = None, golds: list[int] | None = None) -> list[dict]:
    """Multiple-choice items: gold 0 (or `golds`), pred = gold when correct else the other choice."""
    golds = golds or [0] * len(correct)
    ids = ids or [f"q{i}" for i in range(len(correct))]
    return [{"id": i, "task": "rte", "group": None, "gold": g, "pred": g if c else 1 - g, "pred_norm": g,
             "ll": [-1.0, -2.0], "ll_norm": [-1.0, -2.0], "n_tokens": [1, 1]}
            for i, c, g in zip(ids, correct, golds)]


def result(tasks: dict[str, list[dict]]) -> dict:
    """An eval.json-like result: multiple-choice tasks, or perplexity when items carry nll."""
    out = {}
    for task, items in tasks.items():
        if "nll" in items[0]:
            out[task] = {"kind": "perplexity", "n": len(items), "items": items}
        else:
            out[task] = {"kind": "multiple_choice", "acc": np.mean([i["pred"] == i["gold"] for i in items]),
                         "items": items}
    return {"tasks": out}


def bits(n: int, p: float, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).random(n) < p]


def test_item_values_of_both_kinds_and_a_task_without_items():
    ids, values, weights, metric, higher = item_values(result({"rte": mc_items([1, 0, 1])})["tasks"]["rte"])
    assert ids == ["q0", "q1", "q2"] and values.tolist() == [1.0, 0.0, 1.0] and weights is None
    assert (metric, higher) == ("acc", True)
    ppl = {"kind": "perplexity", "items": [{"id": "x", "nll": 6.0, "tokens": 3}, {"id": "y", "nll": 2.0, "tokens": 4}]}
    ids, values, weights, metric, higher = item_values(ppl)
    assert values.tolist() == [2.0, 0.5] and weights.tolist() == [3.0, 4.0] and (metric, higher) == ("nll/token", False)
    assert np.sum(values * weights) / np.sum(weights) == 8.0 / 7.0  # the task's nll per token
    with pytest.raises(MultiLoRAError, match=r"re-run `multilora eval \.\.\. --save-items`"):
        item_values({"kind": "multiple_choice", "acc": 0.5})


def test_identical_results_differ_by_zero_and_cant_tell():
    r = result({"rte": mc_items(bits(50, 0.6, 0)), "wic": mc_items(bits(40, 0.5, 1))})
    rows = compare_paired({"a": [r], "b": [json.loads(json.dumps(r))]})
    assert [(x["task"], x["run"], x["baseline"]) for x in rows] == [("rte", "b", "a"), ("wic", "b", "a"),
                                                                   ("overall", "b", "a")]
    for row in rows:
        assert (row["diff"], row["low"], row["high"], row["verdict"]) == (0.0, 0.0, 0.0, "can't tell")
    assert rows[0]["p_mcnemar"] == 1.0 and rows[2]["p_mcnemar"] is None and rows[0]["n_items"] == 50


def test_a_clear_win_and_loss_with_the_direct_difference_and_mcnemar():
    a, b = bits(200, 0.3, 1), bits(200, 0.75, 2)
    ra, rb = result({"rte": mc_items(a)}), result({"rte": mc_items(b)})
    row, = compare_paired({"base": [ra], "new": [rb]})
    assert row["diff"] == pytest.approx(np.mean(b) - np.mean(a), abs=1e-15) and row["verdict"] == "better"
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    assert row["p_mcnemar"] == pytest.approx(sp.binomtest(only_a, only_a + only_b).pvalue, rel=1e-12)
    iv = paired_bootstrap(np.array(a, float), np.array(b, float))
    assert (row["low"], row["high"]) == (iv.low, iv.high)  # the stats function on the matched values
    worse, = compare_paired({"base": [ra], "new": [rb]}, baseline="new")
    assert worse["run"] == "base" and worse["verdict"] == "worse" and worse["diff"] == -row["diff"]


def test_perplexity_rows_are_the_nll_per_token_difference():
    rng = np.random.default_rng(3)
    tokens = rng.integers(2, 30, size=60)
    nll_a = tokens * rng.normal(2.0, 0.2, 60)
    nll_b = nll_a - tokens * 0.3 + tokens * rng.normal(0, 0.05, 60)
    def items(nll):
        return [{"id": f"e{i}", "nll": float(v), "tokens": int(t)} for i, (v, t) in enumerate(zip(nll, tokens))]

    row, = compare_paired({"a": [result({"alpaca": items(nll_a)})], "b": [result({"alpaca": items(nll_b)})]})
    assert row["metric"] == "nll/token" and row["p_mcnemar"] is None and not row["higher_is_better"]
    assert row["diff"] == pytest.approx(nll_b.sum() / tokens.sum() - nll_a.sum() / tokens.sum(), rel=1e-12)
    assert row["high"] < 0 and row["verdict"] == "better"  # lower nll is better


def test_items_are_matched_by_id_and_a_partial_overlap_is_said():
    a = mc_items([1, 1, 0, 0, 1], ids=["a", "b", "c", "d", "e"])
    b = mc_items([0, 1, 1, 1], ids=["d", "c", "b", "x"])  # other order; "x" only here, "a", "e" only in a
    row, = compare_paired({"A": [result({"rte": a})], "B": [result({"rte": b})]})
    # shared: b (1 vs 1), c (0 vs 1), d (0 vs 0) -> mean difference 1/3
    assert row["n_items"] == 3 and row["diff"] == pytest.approx(1 / 3)
    assert row["note"] == "3 shared items compared (A has 5, B 4)"


def test_no_shared_items_or_a_missing_task_is_an_error_naming_the_task_and_runs():
    a = result({"rte": mc_items([1, 0], ids=["a", "b"])})
    b = result({"rte": mc_items([1, 0], ids=["c", "d"])})
    with pytest.raises(MultiLoRAError, match=r"rte: A and B were scored on different items.*no item in common"):
        compare_paired({"A": [a], "B": [b]})
    c = result({"wic": mc_items([1, 0])})
    with pytest.raises(MultiLoRAError, match=r"task 'rte' is in A but not in C"):
        compare_paired({"A": [a], "C": [c]})
    with pytest.raises(MultiLoRAError, match=r"baseline 'Z' is not one of the compared runs: A, C"):
        compare_paired({"A": [a], "C": [c]}, baseline="Z")
    same_id_other_gold = result({"rte": mc_items([1, 0], ids=["a", "b"], golds=[1, 1])})
    with pytest.raises(MultiLoRAError, match="different gold answers"):
        compare_paired({"A": [a], "B": [same_id_other_gold]})


def test_older_items_without_ids_pair_by_position_only_when_they_agree():
    def no_ids(correct, golds=None):
        return [{k: v for k, v in it.items() if k != "id"} for it in mc_items(correct, golds=golds)]

    row, = compare_paired({"A": [result({"rte": no_ids([1, 0, 0])})], "B": [result({"rte": no_ids([1, 1, 1])})]})
    assert row["diff"] == pytest.approx(2 / 3) and "paired by position" in row["note"]
    with pytest.raises(MultiLoRAError, match="different items.*pair by position only"):
        compare_paired({"A": [result({"rte": no_ids([1, 0, 0])})], "B": [result({"rte": no_ids([1, 1])})]})
    with pytest.raises(MultiLoRAError, match="different items"):
        compare_paired({"A": [result({"rte": no_ids([1, 0])})], "B": [result({"rte": no_ids([1, 0], [1, 0])})]})


def test_seed_groups_pool_demo_and_sweep_names():
    labels = ["lora-seed1", "lora-seed0", "multilora-seed0", "base-eval.json", "n=1__init=lora__seed=1",
              "n=1__init=lora__seed=0", "seed=0", "seed=1", "solo-seed3"]
    assert seed_groups(labels) == {"lora": [1, 0], "multilora-seed0": [2], "base-eval.json": [3],
                                   "n=1__init=lora": [5, 4], "seeds": [6, 7], "solo-seed3": [8]}


def test_seed_groups_pair_seeds_and_widen_when_seeds_disagree():
    base = [result({"rte": mc_items(bits(120, 0.5, s))}) for s in range(3)]
    gain = bits(120, 0.15, 9)
    agree = [result({"rte": mc_items([max(x, g) for x, g in zip(bits(120, 0.5, s), gain)])}) for s in range(3)]
    row, = compare_paired({"base": base, "new": agree})
    expected = np.mean([np.mean([max(x, g) for x, g in zip(bits(120, 0.5, s), gain)]) - np.mean(bits(120, 0.5, s))
                        for s in range(3)])
    assert row["n_seeds"] == 3 and row["diff"] == pytest.approx(expected)
    assert "largest of the per-seed tests" in row["note"]
    mixed = [agree[0], base[1], result({"rte": mc_items([1] * 120)})]  # seed 1 gains nothing, seed 2 everything
    wide, = compare_paired({"base": base, "new": mixed})
    assert wide["high"] - wide["low"] > 2 * (row["high"] - row["low"])
    fewer, = compare_paired({"base": base, "new": agree[:2]})
    assert fewer["n_seeds"] == 2 and "base has 3 seeds, new 2: the first 2 of each paired" in fewer["note"]
    # one result (the base model: no training seed) is paired with every seed of the other group
    one, = compare_paired({"model": base[:1], "new": agree})
    expected = np.mean([np.mean([max(x, g) for x, g in zip(bits(120, 0.5, s), gain)]) - np.mean(bits(120, 0.5, 0))
                        for s in range(3)])
    assert one["n_seeds"] == 3 and one["diff"] == pytest.approx(expected)
    assert "the one result of model is paired with each of the 3 seeds of new" in one["note"]
    back, = compare_paired({"new": agree, "model": base[:1]})
    assert back["diff"] == pytest.approx(-expected) and back["n_seeds"] == 3


def test_overall_row_is_the_mean_of_the_accuracy_differences():
    a = result({"rte": mc_items(bits(80, 0.4, 1)), "wic": mc_items(bits(30, 0.5, 2)),
                "alpaca": [{"id": "e", "nll": 3.0, "tokens": 2}]})
    b = result({"rte": mc_items(bits(80, 0.6, 3)), "wic": mc_items(bits(30, 0.5, 4)),
                "alpaca": [{"id": "e", "nll": 2.0, "tokens": 2}]})
    rows = {r["task"]: r for r in compare_paired({"a": [a], "b": [b]}, n_boot=2000)}
    assert rows["overall"]["diff"] == pytest.approx((rows["rte"]["diff"] + rows["wic"]["diff"]) / 2, abs=1e-15)
    assert rows["overall"]["n_items"] == 110 and rows["alpaca"]["diff"] == -0.5
    assert compare_paired({"a": [a], "b": [b]}, n_boot=2000) == list(rows.values())  # reproducible


def test_forest_png_writes_one_row_per_task_and_run(tmp_path):
    from matplotlib.image import imread

    a = result({"rte": mc_items(bits(80, 0.4, 1)), "wic": mc_items(bits(80, 0.5, 2)),
                "alpaca": [{"id": f"e{i}", "nll": 3.0 + i % 3, "tokens": 2} for i in range(9)]})
    b = result({"rte": mc_items(bits(80, 0.7, 3)), "wic": mc_items(bits(80, 0.5, 4)),
                "alpaca": [{"id": f"e{i}", "nll": 2.0 + i % 2, "tokens": 2} for i in range(9)]})
    few = forest_png(compare_paired({"a": [a], "b": [b]}), tmp_path / "few.png", "two runs")
    many = forest_png(compare_paired({"a": [a], "b": [b], "c": [a]}), tmp_path / "many.png", "three runs")
    assert few == tmp_path / "few.png" and few.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(many).shape[0] > imread(few).shape[0]  # more rows, a taller figure
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


# ----------------------------------------------------------------------------- the CLI, on results the tool wrote


@pytest.fixture(scope="module")
def two_models(tiny_dir, tmp_path_factory):
    """The tiny model and a copy with other random weights, each evaluated with --save-items (and one without)."""
    import torch

    from multilora.models import embedded_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("paired")
    other = root / "other"
    torch.manual_seed(1)
    tiny_model("llama").save_pretrained(other)
    embedded_tokenizer().save_pretrained(other)
    torch.set_num_threads(1)
    for name, model in (("a", tiny_dir), ("b", other)):
        assert cli_main(["eval", str(model), "--tasks", "rte,wic,alpaca", "--limit", "12", "--save-items",
                         "--out", str(root / f"{name}.json")]) == 0
    assert cli_main(["eval", str(other), "--tasks", "rte", "--limit", "4", "--out", str(root / "plain.json")]) == 0
    return root


def test_compare_prints_paired_differences_of_plain_eval_results(two_models, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells at 80 columns; the content is what is checked here
    capsys.readouterr()
    forest = two_models / "forest.png"
    code = cli_main(["eval", "--compare", str(two_models / "a.json"), str(two_models / "b.json"),
                     "--forest", str(forest)])
    out = capsys.readouterr().out
    assert code == 0
    assert "eval comparison" in out and "paired differences vs a.json" in out  # the old table stays, then ours
    a, b = (json.loads((two_models / f"{n}.json").read_text()) for n in "ab")
    rows = compare_paired({"a.json": [a], "b.json": [b]})
    assert [r["task"] for r in rows] == ["rte", "wic", "alpaca", "overall"]
    for r in rows:
        assert r["task"] in out and r["verdict"] in out
    acc = lambda res: np.mean([i["pred"] == i["gold"] for i in res["tasks"]["rte"]["items"]])  # noqa: E731
    assert rows[0]["diff"] == pytest.approx(acc(b) - acc(a), abs=1e-12)
    assert f"{100 * rows[0]['diff']:+.1f} pp" in out
    assert forest.read_bytes()[:4] == b"\x89PNG"
    code = cli_main(["eval", "--compare", str(two_models / "a.json"), str(two_models / "b.json"),
                     "--baseline", "b.json"])
    assert code == 0 and "paired differences vs b.json" in capsys.readouterr().out


def test_compare_without_items_keeps_the_table_and_says_why(two_models, capsys):
    capsys.readouterr()
    code = cli_main(["eval", "--compare", str(two_models / "a.json"), str(two_models / "plain.json")])
    out = capsys.readouterr().out
    assert code == 0 and "eval comparison" in out and "paired differences" not in out
    assert "paired statistics need per-item scores" in out and "--save-items" in out and "plain.json" in out


def test_compare_cli_errors_in_one_line(two_models, capsys):
    code = cli_main(["eval", "--compare", str(two_models / "a.json"), str(two_models / "b.json"), "--baseline", "zz"])
    err = capsys.readouterr().err
    assert code == 2 and "--baseline 'zz' is not one of the compared runs" in err and "a.json" in err
    code = cli_main(["eval", str(two_models / "a.json"), "--forest", str(two_models / "f.png")])
    assert code == 2 and "--forest and --baseline go with --compare" in capsys.readouterr().err
    b = json.loads((two_models / "b.json").read_text())
    b["tasks"]["rte"]["items"] = b["tasks"]["rte"]["items"][:0] + [dict(b["tasks"]["rte"]["items"][0], id="other")]
    (two_models / "b-other.json").write_text(json.dumps(b))
    code = cli_main(["eval", "--compare", str(two_models / "a.json"), str(two_models / "b-other.json")])
    err = capsys.readouterr().err
    assert code == 2 and "rte: a.json and b-other.json were scored on different items" in err


# ----------------------------------------------------------------------------- a sweep's eval.json files


@pytest.fixture(scope="module")
def swept(tiny_dir, tmp_path_factory):
    """A finished sweep: adapter.init = multilora, lora x 2 seeds, 2 steps each, evaluated on 6 rte and wic items."""
    import torch

    from multilora.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    base = root / "base.yaml"
    base.write_text(f"model: {tiny_dir}\nmethod: multilora\n"
                    "adapter: {n: 2, r: 2, alpha: 4, targets: [q_proj, v_proj]}\n"
                    "data: {tasks: [rte, wic], max_len: 64, eval_examples: 0}\noptim: {lr: 0.05}\n"
                    "train: {batch_size: 2, max_steps: 2, eval_every: 0, save_every: 0, cpu: true}\n")
    torch.set_num_threads(1)
    run_sweep(base, [["adapter.init=multilora,lora"]], seeds=2, out_dir=root / "out", limit=6, progress=False)
    return root / "out"


def test_sweep_saves_items_and_reevaluates_a_cached_eval_json_without_them(swept):
    from multilora import sweep

    folder = swept / "runs" / "init=lora__seed=1"
    result = json.loads((folder / "eval.json").read_text())
    assert result["sweep"]["save_items"] is True
    assert all(len(t["items"]) == 6 for t in result["tasks"].values())
    old = dict(result, sweep={k: v for k, v in result["sweep"].items() if k != "save_items"},
               tasks={k: {x: y for x, y in t.items() if x != "items"} for k, t in result["tasks"].items()})
    (folder / "eval.json").write_text(json.dumps(old))  # as an older version cached it
    assert sweep.evaluate_run(folder, ["rte", "wic"], 6, progress=False) is True
    again = json.loads((folder / "eval.json").read_text())
    assert [i["id"] for i in again["tasks"]["rte"]["items"]] == [i["id"] for i in result["tasks"]["rte"]["items"]]
    assert sweep.evaluate_run(folder, ["rte", "wic"], 6, progress=False) is False  # now cached


def test_sweep_md_holds_the_paired_table_and_compare_pools_the_same_seed_groups(swept, capsys, monkeypatch):
    from multilora.sweep_report import PAIRED_PNG, summarize

    md = summarize(swept).read_text()
    assert "## Paired differences vs init=multilora" in md and (swept / PAIRED_PNG).read_bytes()[:4] == b"\x89PNG"
    groups = {c: [json.loads((swept / "runs" / f"{c}__seed={s}" / "eval.json").read_text()) for s in (0, 1)]
              for c in ("init=multilora", "init=lora")}
    rows = compare_paired(groups)
    assert [r["task"] for r in rows] == ["rte", "wic", "overall"] and all(r["n_seeds"] == 2 for r in rows)
    from multilora.paired import interval_text

    for r in rows:
        assert f"| {r['task']} | {r['metric']} | init=lora | {interval_text(r)} |" in md
    # the CLI on the run folders pools them into the same seed groups and prints the same numbers
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    runs = [str(swept / "runs" / n) for n in ("init=multilora__seed=0", "init=multilora__seed=1",
                                               "init=lora__seed=0", "init=lora__seed=1")]
    assert cli_main(["eval", "--compare", *runs]) == 0
    out = capsys.readouterr().out
    assert "paired differences vs init=multilora (seed groups pooled)" in out
    assert ("seed groups: init=multilora = init=multilora__seed=0, init=multilora__seed=1; init=lora = "
            "init=lora__seed=0, init=lora__seed=1") in out
    for r in rows:
        assert interval_text(r) in out
