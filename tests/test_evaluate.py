"""Evaluation: the fast scorer against a slow per-choice reference, batch invariance, merged/unmerged/PEFT
agreement, metric arithmetic, target resolution, eval.json and --compare."""

from __future__ import annotations

import argparse
import functools
import json
import math

import pytest
import torch
from rich.console import Console

import multilora as ml
from conftest import randomize_adapters
from multilora import scoring
from multilora.cli import main as cli_main
from multilora.data import MCItem, encode_prompt, tokenize_example
from multilora.evaluate import (
    MMLU_CATEGORY,
    accuracy,
    add_eval_arguments,
    compare,
    evaluate,
    flat_metrics,
    make_eval_fn,
    max_length,
    mmlu_metrics,
    multirc_metrics,
    read_result,
    resolve_target,
    response_nll,
    result_table,
    run_eval_cli,
    score_choices,
    summary_rows,
)
from multilora.models import embedded_tokenizer, load_model, tiny_model
from multilora.tasks import load_examples, load_items
from multilora.tasks.mmlu import SUBJECTS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def items() -> list[MCItem]:
    """3 RTE + 3 MMLU (1-shot) + 2 MultiRC real items, and hand-made ones with multi-token choices sharing prefixes."""
    handmade = [
        MCItem("custom", "The cat sat on the", [" mat", " warm mat by the door", " warm mat", " sofa"], 1),
        MCItem("custom", "Two plus two is", [" four", " 4", " five, surely", " four."], 0),
    ]
    return (load_items("rte")[:3] + load_items("mmlu_anatomy", k=1)[:3] + load_items("multirc")[:2] + handmade)


@functools.lru_cache(maxsize=None)
def tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random model with the embedded tokenizer's vocabulary (shared: tests must not change it)."""
    torch.manual_seed(seed)
    return tiny_model(family)


def slow_scores(model, tokenizer, items: list[MCItem], chat: bool = False) -> list[list[float]]:
    """Reference: one unpadded forward per prompt+choice, summing log_softmax at the choice positions."""
    out = []
    for item in items:
        prompt = encode_prompt(item.prompt, tokenizer, chat)
        lls = []
        for choice in item.choices:
            tokens = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + tokens])
            assert ids.shape[1] <= max_length(model), "the reference does not truncate; pick shorter items"
            with torch.no_grad():
                logits = model(ids).logits[0]  # (T, V), every position
            logp = torch.log_softmax(logits[len(prompt) - 1:].double(), dim=-1)  # (m, V): predicting the choice
            lls.append(sum(float(logp[k, t]) for k, t in enumerate(tokens)))
        out.append(lls)
    return out


@pytest.mark.parametrize("family, chat", [("llama", False), ("gpt2", False), ("llama", True)])
def test_fast_scorer_matches_slow_path(family, chat, tokenizer, items):
    model = tiny(family)
    fast = score_choices(model, tokenizer, items, batch_size=4, chat=chat)
    slow = slow_scores(model, tokenizer, items, chat)
    assert any(len(it.choices) > 2 for it in items) and any(max(s["n_tokens"]) > 2 for s in fast)
    for item, f, s in zip(items, fast, slow):
        assert f["gold"] == item.gold and f["task"] == item.task and f["group"] == item.group
        assert len(f["ll"]) == len(item.choices)
        for a, b in zip(f["ll"], s):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (item.task, a, b)
        for a, b, n in zip(f["ll_norm"], s, f["n_tokens"]):
            assert abs(a - b / n) <= 1e-5 * max(1.0, abs(b))
        assert f["pred"] == max(range(len(s)), key=s.__getitem__)


def test_scorer_sees_the_token_boundary_training_sees(tokenizer, items):
    from multilora.scoring import _plan

    for item in items:
        trained = tokenize_example(item.example(), tokenizer, max_len=4096)["input_ids"]  # prompt + gold + EOS
        plan = _plan(item, tokenizer, chat=False, max_len=4096, bos=tokenizer.bos_token_id)
        gold = plan["choices"][item.gold]
        row = plan["rows"][plan["choice_row"][item.gold]]
        assert row[: plan["start"] + len(gold)] == trained[:-2]  # the scored inputs: all but the last gold token, EOS
        assert row[: plan["start"] + 1] + gold == trained[:-1]


def test_results_do_not_depend_on_batch_size(tokenizer, items):
    model = tiny("llama")
    runs = [score_choices(model, tokenizer, items, batch_size=b) for b in (1, 3, 8)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"]
            assert max(abs(x - y) for x, y in zip(a["ll"], b["ll"])) <= 1e-5


def test_models_without_logits_to_keep_score_the_same(tokenizer, items):
    class Plain(torch.nn.Module):
        """A causal LM whose forward takes only input_ids and attention_mask."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model = tiny("llama")
    fast = score_choices(model, tokenizer, items[-4:], batch_size=4)
    plain = score_choices(Plain(model), tokenizer, items[-4:], batch_size=4)
    for a, b in zip(fast, plain):
        assert a["pred"] == b["pred"] and max(abs(x - y) for x, y in zip(a["ll"], b["ll"])) <= 1e-5


def test_truncates_long_prompts_from_the_left(tokenizer):
    model = tiny("gpt2")  # 256 positions: a longer prompt must lose its oldest tokens, not crash
    item = MCItem("custom", "word " * 400 + "Answer:", [" yes", " no thanks"], 0)
    choice = tokenizer(" no thanks", add_special_tokens=False)["input_ids"]
    kept = encode_prompt(item.prompt, tokenizer)[-(256 - len(choice) + 1):]  # the longest row fills 256
    [fast] = score_choices(model, tokenizer, [item])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([kept + choice[:-1]])).logits[0], dim=-1)
    ref = sum(float(logp[len(kept) - 1 + k, t]) for k, t in enumerate(choice))
    assert abs(fast["ll"][1] - ref) <= 1e-5 * abs(ref)


def test_merged_unmerged_and_peft_targets_agree(tmp_path, tokenizer, items):
    pytest.importorskip("peft")
    base_dir, ad_dir, peft_dir, merged_dir = (tmp_path / n for n in ("base", "adapter", "peft", "merged"))
    tiny("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, _ = load_model(base_dir)  # records base_dir as its name, so the adapter finds its base
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model, std=0.3)
    ml.save_adapter(model, ad_dir)
    ml.export_peft(ad_dir, peft_dir)
    ml.unload(model)  # merge in place and drop the adapter layers
    model.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)

    scores, kinds = {}, {}
    for name, folder in (("adapter", ad_dir), ("peft", peft_dir), ("merged", merged_dir), ("base", base_dir)):
        m, tok, ident = resolve_target(str(folder))
        kinds[name] = ident["kind"]
        scores[name] = score_choices(m, tok, items, batch_size=8)
    assert kinds == {"adapter": "adapter", "peft": "peft", "merged": "model", "base": "model"}
    m, tok, _ = resolve_target(str(ad_dir))
    ml.merge(m)  # merged in place, adapter layers kept
    scores["merged in place"] = score_choices(m, tok, items, batch_size=8)
    ref = scores["adapter"]
    gap = max(abs(x - y) for a, b in zip(ref, scores["base"]) for x, y in zip(a["ll"], b["ll"]))
    assert gap > 1e-2, "the adapter must change the scores for this test to mean anything"
    for name in ("peft", "merged", "merged in place"):
        for a, b in zip(ref, scores[name]):
            assert a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"], name
            assert max(abs(x - y) for x, y in zip(a["ll"], b["ll"])) <= 1e-4, name


def test_run_folder_finds_its_base_model_in_config_yaml_or_model_option(tmp_path, tokenizer):
    base_dir, run = tmp_path / "base", tmp_path / "run"
    tiny("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, _ = load_model(base_dir)
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=2, targets=["q_proj"]))
    ml.save_adapter(model, run)
    meta = json.loads((run / "adapter_config.json").read_text())
    meta["base_model"]["name_or_path"] = ""  # the weights' checksum does not cover the config
    (run / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ml.MultiLoRAError, match="does not record its base model; pass --model BASE"):
        resolve_target(str(run))
    _, _, ident = resolve_target(str(run), model=str(base_dir))
    assert ident["kind"] == "adapter" and ident["base_model"] == str(base_dir)
    (run / "config.yaml").write_text(f"model: {base_dir}\nmethod: multilora\n")
    m, _, ident = resolve_target(str(run))
    assert ident["base_model"] == str(base_dir) and ident["adapter"]["n"] == 2
    assert ident["adapter_sha256"] == meta["weights_sha256"] and len(ml.adapter_modules(m)) == 2


def test_accuracy_and_chance_on_hand_made_scores():
    scores = [  # golds 0, 1, 1: ll picks 0, 0, 0 (1 right); per-token mean picks 0, 0, 1 (2 right)
        {"ll": [-1.0, -2.0], "ll_norm": [-1.0, -1.5], "pred": 0, "pred_norm": 0, "gold": 0},
        {"ll": [-1.0, -3.0, -2.0], "ll_norm": [-1.0, -3.0, -2.0], "pred": 0, "pred_norm": 0, "gold": 1},
        {"ll": [-1.0, -3.0], "ll_norm": [-3.0, -1.0], "pred": 0, "pred_norm": 1, "gold": 1},
    ]
    m = accuracy(scores)
    assert m["acc"] == pytest.approx(1 / 3) and m["acc_norm"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_multirc_f1a_and_exact_match_by_hand():
    def s(group, pred, gold):
        return {"group": group, "pred": pred, "pred_norm": pred, "gold": gold, "ll": [0.0, 0.0]}

    scores = [s("q1", 1, 1), s("q1", 0, 0), s("q1", 1, 0),  # q1: one false positive -> not exact
              s("q2", 1, 1), s("q2", 0, 0),                  # q2: exact
              s("q3", 0, 1)]                                 # q3: one false negative -> not exact
    m = multirc_metrics(scores)
    tp, fp, fn = 2, 1, 1
    assert m["f1a"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # = 2/3
    assert m["em"] == pytest.approx(1 / 3) and m["questions"] == 3
    p = 3 / 6  # share of true answers: always "yes" has precision p, recall 1
    assert m["f1a_chance"] == pytest.approx(2 * p / (1 + p))
    assert m["em_chance"] == pytest.approx((0.5**3 + 0.5**2 + 0.5) / 3)


def test_mmlu_macro_differs_from_micro_on_uneven_subjects():
    def s(subject, right):
        return {"task": f"mmlu_{subject}", "pred": 0, "pred_norm": 0, "gold": 0 if right else 1, "ll": [0.0] * 4}

    # anatomy (other): 1 of 1 right; astronomy (STEM): 1 of 3 right; philosophy (humanities): 0 of 2
    scores = ([s("anatomy", True)] + [s("astronomy", r) for r in (True, False, False)]
              + [s("philosophy", False)] * 2)
    m = mmlu_metrics(scores)
    assert m["acc"] == pytest.approx(2 / 6)  # micro: every question counts once
    assert m["acc_macro"] == pytest.approx((1 + 1 / 3 + 0) / 3)  # macro: every subject counts once
    assert m["subjects"]["astronomy"]["n"] == 3 and m["subjects"]["astronomy"]["category"] == "STEM"
    assert m["categories"]["other"]["acc"] == 1.0 and m["categories"]["humanities"]["acc"] == 0.0
    assert m["chance"] == 0.25 and set(m["categories"]) == {"other", "STEM", "humanities"}


def test_mmlu_category_map_covers_every_subject_once():
    assert set(MMLU_CATEGORY) == set(SUBJECTS)
    counts = {c: list(MMLU_CATEGORY.values()).count(c) for c in set(MMLU_CATEGORY.values())}
    assert counts == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}


def test_alpaca_perplexity_matches_a_per_example_loop(tokenizer):
    model = tiny("llama")
    examples = load_examples("alpaca", split="val")[:3]
    fast = response_nll(model, tokenizer, examples, batch_size=2)
    nll, count = 0.0, 0
    for ex in examples:
        row = tokenize_example(ex, tokenizer, max_length(model, cap=2048))
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
        for t in range(1, len(labels)):
            if labels[t] != -100:
                nll -= float(logp[t - 1, labels[t]])
                count += 1
    assert fast["tokens"] == count
    assert fast["nll"] == pytest.approx(nll, rel=1e-5)
    assert fast["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_evaluate_reports_every_task_with_chance_and_prompt(tokenizer):
    model = tiny("llama")
    result = evaluate(model, tokenizer, ["rte", "multirc", "mmlu", "alpaca"], shots=2, limit=2, batch_size=16)
    t = result["tasks"]
    assert t["rte"]["n"] == 2 and t["rte"]["chance"] == 0.5 and t["rte"]["prompt_example"].endswith("Answer:")
    assert t["multirc"]["questions"] == 2 and "f1a" in t["multirc"] and "em" in t["multirc"]
    assert t["mmlu"]["n"] == 2 * len(SUBJECTS) and len(t["mmlu"]["subjects"]) == len(SUBJECTS)
    assert t["mmlu"]["shots"] == 2 and t["mmlu"]["prompt_example"].count("Answer:") == 3
    assert set(t["mmlu"]["categories"]) == {"STEM", "humanities", "social sciences", "other"}
    assert t["alpaca"]["kind"] == "perplexity" and t["alpaca"]["n"] == 2 and t["alpaca"]["perplexity"] > 1
    assert result["identity"]["model_class"] == "LlamaForCausalLM"
    json.dumps(result)  # every number is JSON-ready
    rows = summary_rows(result)
    assert ("rte", "acc", t["rte"]["acc"], 0.5, 2) in rows
    flat = flat_metrics(result)
    assert flat["rte/acc"] == t["rte"]["acc"] and flat["mmlu/acc_(macro)"] == t["mmlu"]["acc_macro"]
    assert flat["alpaca/perplexity"] == t["alpaca"]["perplexity"] and "items" not in t["rte"]


def test_eval_fn_for_the_trainer_returns_flat_floats(tokenizer):
    eval_fn = make_eval_fn(tokenizer, ["rte", "alpaca"], limit=2, batch_size=2)
    model = tiny("llama").train()
    scores = eval_fn(model)
    assert model.training, "evaluation must hand the model back in the mode it found it"
    assert set(scores) == {"rte/acc", "rte/acc_norm", "alpaca/perplexity", "alpaca/nll/token"}
    assert all(isinstance(v, float) for v in scores.values())
    model.eval()
    with pytest.raises(ml.MultiLoRAError, match="unknown task 'rtx'"):
        make_eval_fn(tokenizer, ["rtx"])
    saved = evaluate(model, tokenizer, ["rte"], limit=2, save_items=True)["tasks"]["rte"]["items"]
    assert [s["gold"] for s in saved] == [it.gold for it in load_items("rte")[:2]]


def test_unknown_task_is_refused_with_the_known_names(tokenizer):
    with pytest.raises(ml.MultiLoRAError, match=r"unknown task 'rtee'; did you mean 'rte'\?.*known tasks: .*boolq"):
        evaluate(tiny("llama"), tokenizer, ["rte", "rtee"])


def test_bad_targets_name_the_problem(tmp_path):
    with pytest.raises(ml.MultiLoRAError, match="is not a folder; pass a run or adapter folder"):
        resolve_target(str(tmp_path / "missing"))
    with pytest.raises(ml.MultiLoRAError, match="holds neither adapter_config.json nor config.json"):
        resolve_target(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"format": "other"}')
    with pytest.raises(ml.MultiLoRAError, match="neither a multilora adapter .* nor a PEFT adapter"):
        resolve_target(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ml.MultiLoRAError, match="is not valid JSON"):
        resolve_target(str(tmp_path))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "config.yaml").write_text("model: smollm2-135m\n")
    with pytest.raises(ml.MultiLoRAError, match="has checkpoints but no final adapter or model yet"):
        resolve_target(str(run))


def test_cli_writes_eval_json_and_compares_runs(tmp_path, tokenizer, capsys):
    folder = tmp_path / "model"
    tiny("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    run_eval_cli(parser.parse_args([str(folder), "--tasks", "rte,wic", "--limit", "3", "--batch-size", "2",
                                    "--generate", "2", "--max-new-tokens", "3"]))
    result = json.loads((folder / "eval.json").read_text())
    assert result["identity"]["kind"] == "model" and result["settings"]["limit"] == 3
    assert result["tasks"]["wic"]["n"] == 3 and len(result["generations"]) == 2
    out = capsys.readouterr().out
    assert "rte" in out and "wic" in out and "chance" in out and "greedy generations" in out
    other = tmp_path / "other.json"
    run_eval_cli(parser.parse_args([str(folder), "--tasks", "rte", "--limit", "2", "--out", str(other),
                                    "--generate", "1", "--max-new-tokens", "3"]))
    capsys.readouterr()
    run_eval_cli(parser.parse_args(["--compare", str(folder), str(other)]))
    out = capsys.readouterr().out
    assert "model" in out and "other.json" in out and "wic" in out and "greedy generations" in out
    first = result["generations"][0]["output"]
    assert first == json.loads(other.read_text())["generations"][0]["output"]  # greedy: the same output
    with pytest.raises(ml.MultiLoRAError, match="not a multilora eval result"):
        compare([str(folder / "config.json")])
    with pytest.raises(ml.MultiLoRAError, match="unknown task 'mmlux'"):
        run_eval_cli(parser.parse_args([str(folder), "--tasks", "mmlux"]))


@pytest.mark.real_model
@pytest.mark.slow
def test_embedded_model_mmlu_5_shot_is_reproducible():
    model, tok, ident = resolve_target("smollm2-135m")
    assert ident["kind"] == "model" and ident["base_model"] == "smollm2-135m"
    items = [load_items(f"mmlu_{s}", k=5)[0] for s in ("anatomy", "marketing")]
    first = score_choices(model, tok, items, batch_size=2)
    again = score_choices(model, tok, items, batch_size=1)
    assert [s["pred"] for s in first] == [s["pred"] for s in again]
    for f, g in zip(first, again):  # float32 over ~800 tokens: relative 1e-5
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(f["ll"], g["ll"]))
    assert all(-30 < v < 0 for s in first for v in s["ll"])  # a real model: letters are plausible tokens


def test_compare_reads_the_demos_older_eval_json_without_settings(tmp_path, tokenizer, capsys):
    """The demo wrote {"tasks", "identity", "limit"} (no "settings"); --compare refused it (regression)."""
    model = tiny("llama")
    for name in ("lora-seed0", "multilora-seed0"):
        result = evaluate(model, tokenizer, ["rte", "mmlu_anatomy", "alpaca"], limit=2)
        (tmp_path / name).mkdir()
        demo_file = {"tasks": result["tasks"], "identity": {"target": name}, "limit": 2}
        (tmp_path / name / "eval.json").write_text(json.dumps(demo_file))
    code = cli_main(["eval", "--compare", str(tmp_path / "lora-seed0"), str(tmp_path / "multilora-seed0")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "lora-seed0" in captured.out and "multilora-seed0" in captured.out and "perplexity" in captured.out
    assert "mmlu_anatomy" in captured.out
    console = Console(record=True, width=200)
    console.print(result_table(read_result(tmp_path / "lora-seed0")))  # the title's shots come from the task
    assert "(0-shot MMLU)" in console.export_text()


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    """A log file saw nothing of a 217 s MMLU eval: without a terminal, progress is a line every ~10 s (regression)."""
    clock = iter(range(0, 100, 4))  # 4 s per call: started 0, then 4, 8, 12 (a line), 16, 20, 24 (a line), ...
    with scoring.EvalProgress(570, "mmlu", "items", enabled=True, clock=lambda: next(clock)) as bar:
        for _ in range(6):
            bar.advance(20)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["eval mmlu: 60/570 items, 12 s", "eval mmlu: 120/570 items, 24 s", "eval mmlu: 120/570 items, 28 s"]
    with scoring.EvalProgress(5, "rte", "items", enabled=False) as bar:
        bar.advance(5)
    assert capsys.readouterr().err == ""


def test_evaluate_with_progress_logs_each_task_to_stderr_when_not_a_terminal(tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(scoring, "PROGRESS_EVERY_S", 0.0)  # a line per batch
    evaluate(tiny("llama"), tokenizer, ["rte", "mmlu", "alpaca"], limit=1, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "eval rte: 1/1 items" in err and "eval alpaca perplexity: 1/1 examples" in err
    n = len(SUBJECTS)
    assert f"eval mmlu: 2/{n} items" in err and f"eval mmlu: {n}/{n} items" in err  # named by the task, not a subject


def test_bf16_precision_scores_under_autocast_close_to_float32_and_is_recorded(tokenizer, tmp_path):
    model = tiny("llama")
    seen: dict[str, list[torch.dtype]] = {"mlp": [], "head": []}
    hooks = [model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen["mlp"].append(out.dtype)),
             model.lm_head.register_forward_hook(lambda m, a, out: seen["head"].append(out.dtype))]
    try:
        f32 = evaluate(model, tokenizer, ["rte", "alpaca"], limit=6, save_items=True)
        assert set(seen["mlp"]) == set(seen["head"]) == {torch.float32}
        seen = {"mlp": [], "head": []}
        bf16 = evaluate(model, tokenizer, ["rte", "alpaca"], limit=6, save_items=True, precision="bf16")
        assert set(seen["mlp"]) == {torch.bfloat16}, "precision='bf16' must run the layers under bf16 autocast"
        assert set(seen["head"]) == {torch.float32}, "the output head (the logits) stays float32"
    finally:
        for hook in hooks:
            hook.remove()
    assert "forward" not in vars(model.lm_head), "the float32 head is removed after the evaluation"
    assert bf16["settings"]["precision"] == "bf16" and "precision" not in f32["settings"]
    assert next(model.parameters()).dtype == torch.float32, "autocast must leave the weights alone"
    lls = [(a, b) for x, y in zip(f32["tasks"]["rte"]["items"], bf16["tasks"]["rte"]["items"])
           for a, b in zip(x["ll"], y["ll"])]
    assert max(abs(a - b) for a, b in lls) < 0.05 * max(abs(a) for a, _ in lls)  # bf16 keeps ~3 digits
    assert bf16["tasks"]["alpaca"]["perplexity"] == pytest.approx(f32["tasks"]["alpaca"]["perplexity"], rel=0.02)
    with pytest.raises(ml.MultiLoRAError, match="precision must be one of no, bf16, got 'fp8'"):
        evaluate(model, tokenizer, ["rte"], limit=1, precision="fp8")


def test_sweep_eval_cache_is_per_precision(tmp_path, monkeypatch):
    from multilora import sweep
    calls: list[str] = []
    monkeypatch.setattr(sweep, "resolve_target", lambda target: (tiny("llama"), embedded_tokenizer(), {}))
    real = sweep.evaluate
    monkeypatch.setattr(sweep, "evaluate", lambda *a, **k: calls.append(k["precision"]) or real(*a, **k))
    path = tmp_path / "eval.json"
    for precision in ("no", "no", "bf16", "bf16", "no"):
        sweep.evaluate_target("m", path, ["rte"], 2, False, precision=precision)
    assert calls == ["no", "bf16", "no"], "a cached result is reused only at the precision it was made with"
    assert "precision" not in json.loads(path.read_text())["settings"]
    # a bf16 eval.json from before the float32 logits (its cache key lacks "logits") is scored again
    sweep.evaluate_target("m", path, ["rte"], 2, False, precision="bf16")
    old = json.loads(path.read_text())
    assert old["sweep"]["logits"] == "float32"
    del old["sweep"]["logits"]
    path.write_text(json.dumps(old))
    sweep.evaluate_target("m", path, ["rte"], 2, False, precision="bf16")
    assert calls == ["no", "bf16", "no", "bf16", "bf16"]
    assert json.loads(path.read_text())["sweep"]["logits"] == "float32"
