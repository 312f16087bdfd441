"""Own tasks from YAML specs: rendering, label masks, labels, bad input, and a train + eval run through the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from multilora.cli import main
from multilora.data import IGNORE, Example, chat_segments, tokenize_example
from multilora.errors import MultiLoRAError
from multilora.tasks import get_task, load_examples, load_items, use_tasks
from multilora.tasks.custom import gold_indices

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def one(spec: dict) -> str:
    """Register one spec (eval: none unless given) and return its name."""
    return use_tasks([{"eval": None, **spec}])[0]


@pytest.fixture(scope="module")
def tok():
    from multilora.models import embedded_tokenizer

    return embedded_tokenizer()


# ----------------------------------------------------------------------------- formats render exactly


def test_instruction_default_template_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "Boil an egg.", "input": "soft", "output": "6 min"},
                                              {"instruction": "Name a fruit.", "input": "", "output": "apple"},
                                              {"instruction": "Name a colour.", "output": "red"}])
    name = one({"name": "r1", "path": str(path), "format": "instruction"})
    assert load_examples(name) == [
        Example("r1", "### Instruction:\nBoil an egg.\n\n### Input:\nsoft\n\n### Response:\n", "6 min"),
        Example("r1", "### Instruction:\nName a fruit.\n\n### Response:\n", "apple"),
        Example("r1", "### Instruction:\nName a colour.\n\n### Response:\n", "red")]
    assert get_task(name).items is None  # evaluated by response perplexity


def test_instruction_template_separator_and_extra_column(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"task": "Cook", "inp": "rice", "out": "12 min", "cuisine": "thai"}])
    fields = {"instruction": "task", "input": "inp", "output": "out"}
    name = one({"name": "r2", "path": str(path), "format": "instruction", "fields": fields,
                "template": "{instruction} ({cuisine})\n\n{input}"})
    assert load_examples(name) == [Example("r2", "Cook (thai)\n\nrice\n", "12 min")]  # separator "\n" added
    name = one({"name": "r3", "path": str(path), "format": "instruction", "fields": fields,
                "template": "{instruction}: {input} ->", "separator": " "})
    assert load_examples(name) == [Example("r3", "Cook: rice -> ", "12 min")]


def test_completion_separator_rule(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "response": "4"},
                                              {"prompt": "3+3=", "response": " 6"},
                                              {"prompt": "Q: sky?\n", "response": "blue"}])
    name = one({"name": "c1", "path": str(path), "format": "completion"})
    assert [(e.prompt, e.response) for e in load_examples(name)] == [("2+2=\n", "4"), ("3+3=", " 6"),
                                                                     ("Q: sky?\n", "blue")]
    name = one({"name": "c2", "path": str(path), "format": "completion", "separator": ""})
    assert [e.prompt for e in load_examples(name)] == ["2+2=", "3+3=", "Q: sky?\n"]


def test_token_rows_of_a_text_task_are_prompt_then_response_and_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "response": "4"}])
    ex = load_examples(one({"name": "c3", "path": str(path), "format": "completion"}))[0]
    row = tokenize_example(ex, tok, 64)
    p = tok("2+2=\n", add_special_tokens=False)["input_ids"]
    r = tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == p + r and row["labels"] == [IGNORE] * len(p) + r


def test_chat_renders_with_the_template_and_trains_on_assistant_turns_only(tmp_path, tok):
    from multilora.models import embedded_tokenizer

    tok = embedded_tokenizer()  # its own copy: the chat template is set on it
    tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conv": messages}])
    name = one({"name": "ch", "path": str(path), "format": "chat", "fields": {"messages": "conv"}})
    ex = load_examples(name)[0]
    assert ex.messages == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"),
                           ("assistant", "Bye!"))
    pieces = [("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>", False), ("Hello.\n", True),
              ("<|user|>Bye\n<|assistant|>", False), ("Bye!\n", True)]
    assert chat_segments(ex.messages, tok) == pieces
    row = tokenize_example(ex, tok, 256)
    ids, labels = [], []
    for text, trained in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    assert row["input_ids"] == ids and row["labels"] == labels
    assert tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]) == "Hello.\nBye!\n"


def test_instruction_with_chat_true_is_a_user_and_an_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "Name a fruit.", "input": "red", "output": "apple"}])
    ex = load_examples(one({"name": "rc", "path": str(path), "format": "instruction", "chat": True}))[0]
    assert ex.messages == (("user", "Name a fruit.\n\nred"), ("assistant", "apple"))


def test_choice_and_classification_prompts_and_choices(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "Sky?", "opts": ["red", "blue", "green"], "a": 1}])
    name = one({"name": "ch1", "path": str(path), "format": "choice",
                "fields": {"question": "q", "choices": "opts", "label": "a"}})
    assert load_items(name, "train") == [load_items(name, "train")[0]]
    item = load_items(name, "train")[0]
    assert (item.prompt, item.choices, item.gold) == ("Sky?\nA. red\nB. blue\nC. green\nAnswer:", [" A", " B", " C"], 1)
    assert load_examples(name)[0] == Example(name, item.prompt, " B")
    csv_path = write_csv(tmp_path / "r.csv", ["review", "y"], [["Great!", "positive"], ["Awful.", "negative"]])
    name = one({"name": "cl1", "path": str(csv_path), "format": "classification", "labels": ["negative", "positive"],
                "fields": {"text": "review", "label": "y"}, "template": "Review: {text}\nSentiment:"})
    items = load_items(name, "train")
    assert [(i.prompt, i.choices, i.gold) for i in items] == [
        ("Review: Great!\nSentiment:", [" negative", " positive"], 1),
        ("Review: Awful.\nSentiment:", [" negative", " positive"], 0)]


def test_eval_split_by_prompt_hash_and_eval_path(tmp_path):
    from multilora.data import split_bucket

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    name = use_tasks([{"name": "sp", "path": str(path), "format": "completion", "eval": {"split": 0.25}}])[0]
    val = {e.prompt for e in load_examples(name, "val")}
    assert val == {f"q{i}\n" for i in range(60) if split_bucket(f"q{i}\n") < 25} and 0 < len(val) < 60
    assert len(load_examples(name)) + len(val) == 60
    other = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "x", "response": "y"}])
    name = use_tasks([{"name": "sp2", "path": str(path), "format": "completion", "eval": {"path": str(other)}}])[0]
    assert len(load_examples(name)) == 60 and [e.prompt for e in load_examples(name, "val")] == ["x\n"]


# ----------------------------------------------------------------------------- labels


def test_numeric_choice_texts_with_an_index_label_need_label_type(tmp_path):
    for value in ("0", 0):  # a CSV cell, a JSON number
        path = write_jsonl(tmp_path / "n.jsonl", [{"question": "Pick", "choices": ["2", "3", "0", "1"], "label": value}])
        spec = {"name": "num", "path": str(path), "format": "choice", "eval": None}
        with pytest.raises(MultiLoRAError, match=r"n\.jsonl:1: label .* is ambiguous: the text of choice 2 .* or "
                                                 r"index 0; set label_type"):
            use_tasks([spec])
        assert load_items(use_tasks([{**spec, "label_type": "index"}])[0], "train")[0].gold == 0
        assert load_items(use_tasks([{**spec, "label_type": "text"}])[0], "train")[0].gold == 2


def test_boolean_labels_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"question": "Q", "choices": ["no", "yes"], "label": 1},
                                              {"question": "R", "choices": ["no", "yes"], "label": True}])
    for label_type in (None, "index", "text"):
        with pytest.raises(MultiLoRAError, match=r"b\.jsonl:2: label true is a boolean, which would silently count as 1"):
            use_tasks([{"name": "b", "path": str(path), "format": "choice", "eval": None, "label_type": label_type}])
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "t", "label": False}])
    with pytest.raises(MultiLoRAError, match=r"c\.jsonl:1: label false is a boolean"):
        use_tasks([{"name": "c", "path": str(path), "format": "classification", "labels": ["no", "yes"], "eval": None}])


def test_a_label_outside_the_set_names_its_row(tmp_path):
    path = write_csv(tmp_path / "r.csv", ["text", "label"], [["a", "positive"], ["b", "neutral"]])
    spec = {"name": "out", "path": str(path), "format": "classification", "labels": ["negative", "positive"], "eval": None}
    with pytest.raises(MultiLoRAError, match=r"r\.csv:3: label 'neutral' is outside the label set \(an index 0\.\.1 or one "
                                             r"of \['negative', 'positive'\]\); fix the row"):
        use_tasks([spec])
    with pytest.raises(MultiLoRAError, match=r"r\.csv:2: label 'positive' is outside the label set \(an index 0\.\.1\)"):
        use_tasks([{**spec, "label_type": "index"}])
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "Q", "choices": ["x", "y"], "label": 2}])
    with pytest.raises(MultiLoRAError, match=r"t\.jsonl:1: label 2 is outside the label set"):
        use_tasks([{"name": "out2", "path": str(path), "format": "choice", "eval": None}])


def test_label_inference_reads_indices_or_texts_and_refuses_a_mix():
    texts = ["negative", "positive"]
    assert gold_indices([("f:2", "1", texts), ("f:3", "0", texts)], None) == [1, 0]  # CSV indices
    assert gold_indices([("f:2", "positive", texts), ("f:3", "negative", texts)], None) == [1, 0]
    assert gold_indices([("f:2", "1", ["0", "1"])], None) == [1]  # both readings agree: not ambiguous
    with pytest.raises(MultiLoRAError, match=r"mixes label texts \(f:2: 'positive'\) and indices \(f:3: 0\)"):
        gold_indices([("f:2", "positive", texts), ("f:3", 0, texts)], None)


# ----------------------------------------------------------------------------- paths


def test_task_file_paths_resolve_against_the_file_and_config_records_them_absolute(tmp_path, monkeypatch):
    from multilora.config import load_config

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "c.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(30)])
    tasks = tmp_path / "specs" / "my_tasks.yaml"
    tasks.parent.mkdir()
    tasks.write_text(yaml.safe_dump([{"name": "own", "path": "../data/c.jsonl", "format": "completion"}, "rte"]))
    monkeypatch.chdir(tmp_path / "specs")
    c = load_config(None, ["--data.tasks", "my_tasks.yaml"])  # relative to the cwd, its paths to the file
    assert c.data.tasks == [{"name": "own", "path": str(tmp_path / "data" / "c.jsonl"), "format": "completion"}, "rte"]
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": {"tasks": [{"name": "own", "path": "data/c.jsonl",
                                                          "format": "completion"}, "specs/my_tasks.yaml"]}}))
    monkeypatch.chdir(tmp_path / "data")  # an unrelated cwd
    with pytest.raises(MultiLoRAError, match="task\\(s\\) own listed twice"):
        load_config(config)
    config.write_text(yaml.safe_dump({"data": {"tasks": "specs/my_tasks.yaml"}}))
    again = load_config(config)
    assert again.data.tasks == c.data.tasks
    assert load_config(None, ["--data.tasks", json.dumps(again.data.tasks)]).data.tasks == c.data.tasks  # round trip


def test_spec_weights_feed_the_weights_mixture(tmp_path):
    from multilora.config import load_config

    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(30)])
    spec = {"name": "w", "path": str(path), "format": "completion", "weight": 3.0}
    c = load_config(None, ["--data.tasks", json.dumps([spec, "rte"]), "--data.mixture", "weights",
                           "--data.weights", "{rte: 1}"])
    from multilora.tasks import mixture_weights

    assert mixture_weights(c.data.tasks, c.data.weights) == {"w": 3.0, "rte": 1.0}
    with pytest.raises(MultiLoRAError, match="task\\(s\\) w give a weight but data.mixture is 'proportional'"):
        load_config(None, ["--data.tasks", json.dumps([spec, "rte"])])
    with pytest.raises(MultiLoRAError, match="one positive weight per task"):
        load_config(None, ["--data.tasks", json.dumps([spec, "rte"]), "--data.mixture", "weights"])


# ----------------------------------------------------------------------------- bad input: one line, exit 2, no model


@pytest.fixture
def no_model(monkeypatch):
    """Every binding of load_model raises: a bad spec must be refused before any model loads."""
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in ("models", "plan", "targets"):
        monkeypatch.setattr(importlib.import_module(f"multilora.{module}"), "load_model", refuse)


def bad_specs(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    data = write_jsonl(tmp_path / "recipes.jsonl",
                       [{"instruction": "Cook", "input": "", "output": "ok"} for _ in range(3)])
    base = {"name": "recipes", "path": str(data), "format": "instruction"}
    return {
        "unknown format": ({**base, "format": "instruct"}, "format 'instruct' is not valid \\(did you mean 'instruction'\\?\\)"),
        "missing file": ({**base, "path": str(tmp_path / "nope.jsonl")}, "nope.jsonl not found"),
        "field typo": ({**base, "fields": {"instruction": "instrucion"}},
                       "no column 'instrucion' for the instruction field .* did you mean 'instruction'\\? columns "
                       "present: instruction, input, output"),
        "role typo": ({**base, "fields": {"outptu": "output"}}, "'outptu' is not a field of format instruction "
                      "\\(did you mean 'output'\\?\\)"),
        "empty split": ({**base, "eval": {"split": 0.05}}, "eval split 0.05 puts none of the 3 rows in val"),
        "template field": ({**base, "template": "{instruction} {topic}"},
                           "template names \\{topic\\}, which is neither a field of format instruction .* columns: "
                           "instruction, input, output"),
    }


@pytest.mark.parametrize("case", ["unknown format", "missing file", "field typo", "role typo", "empty split",
                                  "template field"])
def test_bad_specs_exit_2_with_one_line_before_any_model_loads(case, tmp_path, capsys, no_model):
    spec, message = bad_specs(tmp_path)[case]
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump([spec, "rte"]))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run")}))
    for argv in (["train", str(config), "--data.tasks", str(tasks)],
                 ["eval", "smollm2-135m", "--tasks", f"{tasks},rte", "--out", str(tmp_path / "e.json")],
                 ["tasks", "--preview", str(tasks)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert __import__("re").search(message, err), (argv, err)
    assert not (tmp_path / "run").exists()


def test_every_bad_spec_is_reported_at_once(tmp_path):
    from multilora.config import load_config

    specs = bad_specs(tmp_path)
    entries = [{**specs["unknown format"][0], "name": "a"}, {**specs["field typo"][0], "name": "b"},
               "data/recipes.jsonl", "rtee"]
    with pytest.raises(MultiLoRAError) as e:
        load_config(None, ["--data.tasks", json.dumps(entries)])
    msg = str(e.value)
    assert msg.startswith("4 problem(s)")
    for part in ("format 'instruct' is not valid", "no column 'instrucion'",
                 "'data/recipes.jsonl' is a data file, not a task", "unknown task 'rtee' (did you mean 'rte'?)"):
        assert part in msg, part


# ----------------------------------------------------------------------------- preview


def test_preview_marks_the_loss_part_and_counts_rows_cut(tmp_path, tiny_dir, capsys):
    from multilora.models import embedded_tokenizer

    rows = [{"prompt": "Say hi", "response": "hi"}, {"prompt": "Count " + "one two " * 20, "response": "done"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    labels = write_csv(tmp_path / "r.csv", ["text", "label"], [["good", "1"], ["bad", "0"]])
    tasks = tmp_path / "t.yaml"
    tasks.write_text(yaml.safe_dump([{"name": "pv", "path": str(path), "format": "completion", "eval": None},
                                     {"name": "pl", "path": str(labels), "format": "classification", "eval": None,
                                      "labels": ["bad", "good"]}]))
    assert main(["tasks", "--preview", str(tasks), "--model", str(tiny_dir), "-k", "1", "--max-len", "20"]) == 0
    out = capsys.readouterr().out
    tok = embedded_tokenizer()
    sizes = [len(tok(r["prompt"] + "\n", add_special_tokens=False)["input_ids"])
             + len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    assert f"{sum(n > 20 for n in sizes)} of 2 rows longer than max_len 20" in out and sum(n > 20 for n in sizes) == 1
    assert f"-- example 1: {sizes[0]} tokens, 2 with loss --\nSay hi\n[[hi{tok.eos_token}]]" in out
    assert "label set: ' bad', ' good'" in out and "good\nAnswer:[[ good" in out


# ----------------------------------------------------------------------------- train + eval through the CLI


def _ll(model, tok, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt) by one plain forward pass (tokens as training splits them)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c))


def test_train_and_eval_own_tasks_through_the_cli(tmp_path, tiny_dir, monkeypatch):
    from multilora.targets import resolve_target

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "trivia.jsonl", [{"question": f"What is {i} + {i}?", "choices": [str(2 * i), str(i), str(i + 1)],
                                         "answer_idx": i % 3} for i in range(24)])
    write_csv(data / "reviews.csv", ["text", "label"],
              [[f"item {i} was {'great' if i % 2 else 'bad'}", "positive" if i % 2 else "negative"] for i in range(24)])
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_dir), "method": "multilora", "output_dir": str(tmp_path / "run"),
        "adapter": {"n": 2, "r": 4, "targets": "all-linear"},
        "data": {"tasks": [
            {"name": "trivia", "path": "data/trivia.jsonl", "format": "choice", "label_type": "index",
             "fields": {"question": "question", "choices": "choices", "label": "answer_idx"}, "eval": {"split": 0.3}},
            {"name": "reviews", "path": "data/reviews.csv", "format": "classification",
             "labels": ["negative", "positive"], "eval": {"split": 0.3}},
            "rte"], "max_len": 64, "eval_examples": 4},
        "optim": {"lr": 1e-2}, "train": {"max_steps": 4, "batch_size": 4, "save_every": 0, "cpu": True}}))
    monkeypatch.chdir(tmp_path / "data")  # paths resolve against the YAML file, not the cwd
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["tasks"]
    assert [Path(t["path"]).is_absolute() for t in recorded[:2]] == [True, True]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--tasks", "trivia,reviews,rte", "--limit", "6", "--save-items",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    model, tok, _ = resolve_target(str(run))
    for task in ("trivia", "reviews", "rte"):
        items = load_items(task)[:6]
        r = result["tasks"][task]
        assert r["kind"] == "multiple_choice" and r["n"] == len(items) > 0
        lls = [[_ll(model, tok, it.prompt, c) for c in it.choices] for it in items]
        for mine, theirs in zip(lls, r["items"]):
            assert theirs["ll"] == pytest.approx(mine, abs=1e-4)
        acc = sum(max(range(len(ll)), key=ll.__getitem__) == it.gold for ll, it in zip(lls, items)) / len(items)
        assert r["acc"] == pytest.approx(acc) and r["chance"] == pytest.approx(
            sum(1 / len(it.choices) for it in items) / len(items))
    assert not math.isnan(result["tasks"]["trivia"]["acc"])


def test_generation_tasks_report_perplexity_and_exact_match(tmp_path, tiny_dir):
    from multilora.evaluate import evaluate
    from multilora.models import load_model
    from multilora.tasks.metrics import normalize_answer

    rows = [{"instruction": f"Repeat {w}.", "output": w} for w in ("cat", "dog", "sun", "sea", "tree", "hill")]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    name = use_tasks([{"name": "em", "path": str(path), "format": "instruction", "metric": "exact_match",
                       "eval": {"path": str(path)}}])[0]
    model, tok = load_model(tiny_dir)
    result = evaluate(model, tok, [name], save_items=True)
    r = result["tasks"][name]
    examples = load_examples(name, "val")
    nll = count = 0
    for ex in examples:
        ll = _ll(model, tok, ex.prompt, ex.response)
        p = tok(ex.prompt, add_special_tokens=False)["input_ids"] + tok(ex.response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            eos = float(torch.log_softmax(model(torch.tensor([p])).logits[0, -1].double(), -1)[tok.eos_token_id])
        nll -= ll + eos
        count += len(tok(ex.response, add_special_tokens=False)["input_ids"]) + 1
    assert r["kind"] == "perplexity" and r["n"] == 6 and r["tokens"] == count
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    longest = max(len(tok(ex.response, add_special_tokens=False)["input_ids"]) for ex in examples)
    hits = []
    for ex, saved in zip(examples, r["outputs"]):
        ids = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(longest + 2):  # greedy, by hand
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        text = tok.decode(new, skip_special_tokens=True)
        assert saved["output"] == text
        hits.append(normalize_answer(text.strip().split("\n")[0]) == normalize_answer(ex.response))
    assert r["exact_match"] == sum(hits) / len(hits)
    from multilora.tables import summary_rows

    assert (name, "exact_match", r["exact_match"], 0.0, 6) in summary_rows(result)


def test_normalize_answer():
    from multilora.tasks.metrics import exact_match, normalize_answer

    assert normalize_answer("  The Eiffel-Tower! ") == "eiffeltower"
    assert exact_match(["An apple.\nmore text", "pear"], ["apple", "Apple"]) == 0.5


def test_chat_task_perplexity_covers_assistant_tokens_only(tmp_path, tiny_dir):
    from multilora.models import load_model
    from multilora.scoring import response_nll

    model, tok = load_model(tiny_dir)
    tok.chat_template = CHAT_TEMPLATE
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    ex = load_examples(one({"name": "chp", "path": str(path), "format": "chat"}))[0]
    r = response_nll(model, tok, [ex])
    prompt, answer = "<|user|>Hi\n<|assistant|>", "Hello there.\n"
    assert r["tokens"] == len(tok(answer, add_special_tokens=False)["input_ids"])
    assert r["nll"] == pytest.approx(-_ll(model, tok, prompt, answer), rel=1e-5)


def test_a_datasets_folder_and_a_parquet_file_work_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"review": "fine", "y": 1}, {"review": "poor", "y": 0}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    for path in (tmp_path / "ds", tmp_path / "r.parquet"):
        name = use_tasks([{"name": "dsr", "path": str(path), "format": "classification", "eval": None,
                           "labels": ["bad", "good"], "fields": {"text": "review", "label": "y"}}])[0]
        assert [(i.prompt, i.gold) for i in load_items(name, "train")] == [("fine\nAnswer:", 1), ("poor\nAnswer:", 0)]


def test_eval_none_trains_only_and_evaluation_says_so(tmp_path):
    from multilora.evaluate import evaluate
    from multilora.models import tiny_model

    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b"}])
    name = use_tasks([{"name": "noeval", "path": str(path), "format": "completion", "eval": None}])[0]
    assert get_task(name).splits == ("train",) and len(load_examples(name)) == 1
    with pytest.raises(MultiLoRAError, match="task 'noeval' has no 'val' split \\(eval: none\\); give eval: "):
        evaluate(tiny_model(), None, [name])


def test_load_custom_items_refuses_ambiguous_and_boolean_labels(tmp_path):
    from multilora.tasks import load_custom_items

    path = write_jsonl(tmp_path / "n.jsonl", [{"p": "Pick", "c": ["2", "3", "0", "1"], "l": "0"}])
    with pytest.raises(MultiLoRAError, match=r"n\.jsonl:1: l '0' is ambiguous"):
        load_custom_items(path, "p", "c", "l")
    assert load_custom_items(path, "p", "c", "l", label_type="index")[0].gold == 0
    assert load_custom_items(path, "p", "c", "l", label_type="text")[0].gold == 2
    path = write_jsonl(tmp_path / "b.jsonl", [{"p": "Q", "c": ["no", "yes"], "l": True}])
    with pytest.raises(MultiLoRAError, match=r"b\.jsonl:1: l true is a boolean"):
        load_custom_items(path, "p", "c", "l")


def test_a_long_conversation_keeps_its_last_assistant_tokens(tok):
    from multilora.models import embedded_tokenizer

    tok = embedded_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ex = Example("c", "", "", (("user", "word " * 40), ("assistant", "yes")))
    full = tokenize_example(ex, tok, 10_000)
    row = tokenize_example(ex, tok, 12)
    assert row["input_ids"] == full["input_ids"][-12:] and row["labels"] == full["labels"][-12:]
    late = Example("c", "", "", (("user", "hi"), ("assistant", "ok"), ("user", "word " * 40)))
    with pytest.raises(MultiLoRAError, match="its last assistant turn does not fit in 24"):
        tokenize_example(late, tok, 24)
    cut, whole = tokenize_example(late, tok, 24, truncate=True), tokenize_example(late, tok, 10_000)
    assert cut["input_ids"] == whole["input_ids"][:24] and cut["labels"] == whole["labels"][:24]
    assert tok.decode([i for i, lab in zip(cut["input_ids"], cut["labels"]) if lab != IGNORE]) == "ok\n"
    with pytest.raises(MultiLoRAError, match="a conversation starts with an assistant message"):
        tokenize_example(Example("c", "", "", (("assistant", "ok"),)), tok, 12)


def test_a_mapped_optional_input_column_must_exist(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "a", "context": "b", "output": "c"},
                                              {"instruction": "d", "output": "e"}])
    spec = {"name": "opt", "path": str(path), "format": "instruction", "eval": None}
    with pytest.raises(MultiLoRAError, match=r"r\.jsonl:1: no column 'contxt' for the input field .* did you mean "
                                             r"'context'\? columns present: instruction, context, output"):
        use_tasks([{**spec, "fields": {"input": "contxt"}}])
    name = use_tasks([{**spec, "fields": {"input": "context"}}])[0]  # rows without it have no input
    assert [e.prompt for e in load_examples(name)] == [alpaca_prompt("a", "b"), alpaca_prompt("d", "")]


def alpaca_prompt(instruction: str, input_text: str) -> str:
    return (f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{input_text}\n\n" if input_text else "")
            + "### Response:\n")
