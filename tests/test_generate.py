"""`multilora generate`: outputs equal model.generate run by hand, --compare-base, seeded sampling, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

import multilora as ml
from multilora import generate as generate_module
from multilora import targets
from multilora.cli import main
from multilora.models import load_model
from multilora.tasks import load_examples

PROMPTS = ["The capital of France is", "Once upon a time"]
NEW = 8


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    """A multilora adapter on the tiny model with random non-zero factors and scales (dW != 0)."""
    model, _ = load_model(tiny_dir)  # records tiny_dir as its base
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ml.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("gen") / "adapter"
    ml.save_adapter(model, folder)
    return folder


def by_hand(model, tokenizer, prompt: str, **sampling) -> str:
    """model.generate on the tokenizer's own encoding of `prompt`, decoded (the reference for each row)."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, pad_token_id=tokenizer.pad_token_id,
                             **(sampling or {"do_sample": False}))
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cli(*argv) -> int:
    return main(["generate", *map(str, argv)])


def test_greedy_output_equals_model_generate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    args = [x for p in PROMPTS for x in ("--prompt", p)]
    assert cli(tiny_dir, *args, "--max-new-tokens", NEW, "--out", out) == 0
    printed = capsys.readouterr().out
    rows = rows_of(out)
    model, tok = load_model(tiny_dir)
    expected = [by_hand(model, tok, p) for p in PROMPTS]
    assert [r["output"] for r in rows] == expected and all(expected)
    assert [r["prompt"] for r in rows] == PROMPTS and [r["index"] for r in rows] == [0, 1]
    assert {r["model"] for r in rows} == {"target"} and [r["source"] for r in rows] == ["--prompt 1", "--prompt 2"]
    assert all(r["new_tokens"] <= NEW and r["stop"] in ("eos", "length") for r in rows)
    assert "greedy" in printed and "The capital of France is" in printed and "wrote 2 rows" in printed


def test_compare_base_adapter_rows_differ_and_base_rows_equal_the_base_model(adapter_dir, tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp.jsonl"
    assert cli(adapter_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--compare-base",
               "--max-new-tokens", NEW, "--out", out) == 0
    rows = rows_of(out)
    assert [(r["index"], r["model"]) for r in rows] == [(0, "target"), (0, "base"), (1, "target"), (1, "base")]
    base_model, tok = load_model(tiny_dir)
    base = [by_hand(base_model, tok, p) for p in PROMPTS]
    tuned = [by_hand(ml.load_adapter(load_model(tiny_dir)[0], adapter_dir), tok, p) for p in PROMPTS]
    assert [r["output"] for r in rows if r["model"] == "base"] == base
    assert [r["output"] for r in rows if r["model"] == "target"] == tuned
    assert tuned != base  # the adapter changes the model, and the rows show it
    assert rows[1]["name"] == str(tiny_dir) and rows[0]["name"] == str(adapter_dir)
    printed = capsys.readouterr().out
    assert "base:" in printed  # the base column beside the adapter's

    # the same comparison through the library, and for the adapter exported to PEFT (lossless, so equal rows)
    prompts = generate_module.collect_prompts(PROMPTS)
    lib = generate_module.generate(str(adapter_dir), prompts, compare_base=True, max_new_tokens=NEW)
    assert [r["output"] for r in lib] == [r["output"] for r in rows]
    plain = generate_module.generate(str(adapter_dir), PROMPTS, max_new_tokens=NEW)  # plain strings work too
    assert [r["output"] for r in plain] == tuned and plain[0]["source"] == "prompt 0"
    ml.export_peft(adapter_dir, tmp_path / "peft")
    peft_rows = generate_module.generate(str(tmp_path / "peft"), prompts, compare_base=True, max_new_tokens=NEW)
    assert [r["output"] for r in peft_rows] == [r["output"] for r in rows]


def test_compare_base_on_a_merged_model_needs_its_base(adapter_dir, tiny_dir, tmp_path, capsys):
    merged = ml.export.export_merged(adapter_dir, tmp_path / "merged")
    assert cli(merged, "--prompt", PROMPTS[0], "--compare-base") == 2  # a merged folder does not name its base
    assert "is a plain model" in capsys.readouterr().err
    rows = generate_module.generate(str(merged), generate_module.collect_prompts(PROMPTS[:1]), model=str(tiny_dir),
                                    compare_base=True, max_new_tokens=NEW)
    model, tok = load_model(tiny_dir)
    assert rows[1]["model"] == "base" and rows[1]["output"] == by_hand(model, tok, PROMPTS[0])
    tuned = ml.load_adapter(load_model(tiny_dir)[0], adapter_dir)
    assert rows[0]["output"] == by_hand(tuned, tok, PROMPTS[0])


def test_seed_makes_sampling_reproducible(tiny_dir, tmp_path):
    def sample(seed: int, name: str) -> list[str]:
        out = tmp_path / name
        assert cli(tiny_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--temperature", "1.0", "--top-p", "0.9",
                   "--seed", seed, "--max-new-tokens", NEW, "--out", out) == 0
        return [r["output"] for r in rows_of(out)]

    first, again, other = sample(3, "a.jsonl"), sample(3, "b.jsonl"), sample(4, "c.jsonl")
    assert first == again and first != other
    model, tok = load_model(tiny_dir)  # prompt i is sampled with seed + i
    expected = []
    for i, prompt in enumerate(PROMPTS):
        torch.manual_seed(3 + i)
        expected.append(by_hand(model, tok, prompt, do_sample=True, temperature=1.0, top_p=0.9, top_k=0))
    assert first == expected
    state = torch.random.get_rng_state()
    ml.scoring.generate_texts(model, tok, PROMPTS, NEW, temperature=1.0, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is untouched


def test_prompts_from_a_file_and_a_task(tiny_dir, tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "Hello", "id": 7}\n\n{"prompt": "Bye"}\n', encoding="utf-8")
    prompts = generate_module.collect_prompts(["first"], file=file, task="rte", n=2)
    rte = load_examples("rte", "val")[:2]
    assert [p.text for p in prompts] == ["first", "Hello", "Bye"] + [ex.prompt for ex in rte]
    assert [p.source for p in prompts] == ["--prompt", f"{file}:1", f"{file}:3", "rte val 0", "rte val 1"]
    assert [p.reference for p in prompts[3:]] == [ex.response for ex in rte]
    out = tmp_path / "t.jsonl"
    assert cli(tiny_dir, "--task", "rte", "-n", 1, "--max-new-tokens", 2, "--out", out) == 0
    (row,) = rows_of(out)
    assert row["prompt"] == rte[0].prompt and row["reference"] == rte[0].response


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: bad input must be refused first."""
    def refuse(*args, **kwargs):
        pytest.fail(f"a model was loaded before the bad input was refused: {args[:1]!r}")
    for module in (targets, generate_module):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.mark.parametrize("make_args, message", [
    (lambda d, t: ["--file", t / "absent.jsonl"], r"absent\.jsonl: file not found"),
    (lambda d, t: ["--file", write(t / "p.jsonl", '{"prompt": "a"}\n{"prompt": \n')], r"p\.jsonl:2: malformed JSON"),
    (lambda d, t: ["--file", write(t / "p.jsonl", '{"prompt": "a"}\n["b"]\n')], r"p\.jsonl:2: expected a JSON object"),
    (lambda d, t: ["--file", write(t / "p.jsonl", '{"text": "a"}\n')], r"p\.jsonl:1: missing field 'prompt'"),
    (lambda d, t: ["--file", write(t / "p.jsonl", '{"prompt": 3}\n')], r"p\.jsonl:1: field 'prompt' must be str"),
    (lambda d, t: ["--file", write(t / "p.jsonl", '{"prompt": "  "}\n')], r"p\.jsonl:1: the prompt is empty"),
    (lambda d, t: ["--task", "rtee"], r"unknown task 'rtee'; did you mean 'rte'"),
    (lambda d, t: [], r"no prompts: give --prompt TEXT"),
    (lambda d, t: ["--prompt", "a", "--compare-base"], r"--compare-base needs an adapter .* is a plain model"),
    (lambda d, t: ["--prompt", "a", "--temperature", "-1"], r"--temperature must be a number, at least 0"),
    (lambda d, t: ["--prompt", "a", "--temperature", "nan"], r"--temperature must be a number, at least 0"),
    (lambda d, t: ["--prompt", "a", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (lambda d, t: ["--prompt", "a", "--max-new-tokens", "0"], r"--max-new-tokens must be at least 1"),
    (lambda d, t: ["--task", "rte", "-n", "0"], r"-n must be at least 1"),
    (lambda d, t: ["--prompt", "a", "--out", t], r"--out .* is a folder"),
])
def test_bad_input_is_one_line_exit_2_before_any_model_loads(make_args, message, tiny_dir, tmp_path, no_model,
                                                              capsys):
    assert cli(tiny_dir, *make_args(tiny_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multilora generate: error:"), err
    assert re.search(message, err), err


def test_compare_base_on_the_embedded_model_is_refused_before_loading(no_model, capsys):
    assert cli("smollm2-135m", "--prompt", "a", "--compare-base") == 2
    assert "'smollm2-135m' is a plain model" in capsys.readouterr().err


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path
