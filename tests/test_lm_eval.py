"""lm-eval-harness on an exported adapter: `--model hf --model_args pretrained=...,peft=...` with a local
task YAML over a local JSONL (offline) gives the same accuracy, item by item, as `multilora eval`; and
on k-shot prompts (a long shared prefix) lm-eval's HFLM over the same model object gives our
per-choice log-likelihoods and answers (benchmarks/bench_eval.py --vs-lm-eval does this at full size).

The task YAML reproduces our multiple-choice scoring exactly: doc_to_text is our prompt verbatim,
doc_to_choice our choices without their leading space and target_delimiter " " (lm-eval's default),
so lm-eval scores context = prompt, continuation = " True" / " False" -- our prompt and choices.
lm-eval tokenizes prompt + choice together and splits after the prompt's tokens, we tokenize them
apart; for choices that start with a space the two agree (a BPE merge never crosses that space).
Its `acc` is the argmax of the summed choice log-likelihood, as ours; its `acc_norm` divides by the
choice's length in bytes where ours divides by tokens, so only `acc` is compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

N_ITEMS = 10
TASK = "multilora_rte_local"

TASK_YAML = """\
task: {task}
dataset_path: json                       # datasets' JSON builder: a local file, no hub
dataset_kwargs:
  data_files:
    test: {jsonl}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: prompt                      # a field name: the prompt verbatim (ends in "Answer:")
doc_to_choice: choices                   # ["True", "False"]
doc_to_target: gold                      # index of the right choice
target_delimiter: " "                    # continuation = " " + choice = our " True" / " False"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub: every download path of transformers, datasets and the hub client is off."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def write_task(folder: Path, items: list, cache: Path, name: str = TASK) -> Path:
    """`folder`/`name`.jsonl (prompt, choices without the leading space, gold) + `folder`/`name`.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            assert all(c.startswith(" ") for c in it.choices)  # what target_delimiter " " puts back
            f.write(json.dumps({"prompt": it.prompt, "choices": [c[1:] for c in it.choices], "gold": it.gold}) + "\n")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(task=name, jsonl=json.dumps(str(folder / f"{name}.jsonl")),
                                                          cache=json.dumps(str(cache))))
    return folder


@pytest.mark.slow
def test_lm_eval_on_exported_peft_adapter_matches_multilora_eval(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import multilora as ml
    from multilora.evaluate import evaluate, score_choices
    from multilora.tasks import eval_items
    from multilora.export import export_peft
    from multilora.models import embedded_tokenizer, tiny_model

    # a base model folder, and a MultiLoRA adapter with random non-zero weights, exported as PEFT
    base_dir, peft_dir = tmp_path / "base", tmp_path / "peft"
    torch.manual_seed(0)
    tokenizer = embedded_tokenizer()
    base = tiny_model("llama")
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = tiny_model("llama")
    model.load_state_dict(base.state_dict())
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, alpha=8, targets="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ml.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    export_peft(model, peft_dir, base_model_name_or_path=str(base_dir))
    model.eval()

    # `multilora eval` (the Python side of it) on the first N_ITEMS RTE validation items
    ours = evaluate(model, tokenizer, ["rte"], limit=N_ITEMS, save_items=True)["tasks"]["rte"]
    items, scores = eval_items("rte", 0, N_ITEMS), ours["items"]
    assert len(items) == len(scores) == ours["n"] == N_ITEMS
    assert [s["gold"] for s in scores] == [it.gold for it in items]
    assert len({s["pred"] for s in scores}) == 2  # the adapter makes a non-constant model: acc means something
    base_ll = [s["ll"] for s in score_choices(base, tokenizer, items)]
    assert max(abs(a - b) for s, bl in zip(scores, base_ll) for a, b in zip(s["ll"], bl)) > 0.1  # it matters

    task_dir = write_task(tmp_path / "tasks", items, tmp_path / "datasets_cache")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={base_dir},peft={peft_dir},dtype=float32",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=4, device="cpu", log_samples=True, bootstrap_iters=0, num_fewshot=0,
    )
    theirs = out["results"][TASK]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])

    # item by item: the same prompt text, the same log-likelihoods, the same predictions
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == N_ITEMS
    for it, ours_i, s in zip(items, scores, samples):
        assert s["arguments"][0][0] == it.prompt and [a[1] for a in s["arguments"]] == it.choices
        ll = [float(r[0]) for r in s["filtered_resps"]]
        assert ll == pytest.approx(ours_i["ll"], abs=1e-3)
        assert s["acc"] == float(ours_i["pred"] == ours_i["gold"])
    # ... which are the adapter's: lm-eval loaded the PEFT adapter on top of the base model
    their_ll = [float(r[0]) for s in samples for r in s["filtered_resps"]]
    assert their_ll != pytest.approx([v for ll in base_ll for v in ll], abs=0.05)


K_SHOT_TASK = "multilora_mmlu_3shot_local"
K_SHOT_ITEMS = 12
LL_TOL = 1e-4  # float32: per-choice log-likelihoods of the two implementations


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_lm_eval_k_shot_log_likelihoods_equal_score_choices(tmp_path, adapter):
    """MMLU 3-shot (every prompt starts with the same subject header + 3 examples, ~230 shared tokens):
    lm-eval's HFLM over the same model object gives our per-choice log-likelihoods (<= LL_TOL) and
    answers, item by item, whatever our batch size (1: no other prompt in the batch; 5: mixed lengths).
    """
    from lm_eval.evaluator import evaluate as lm_eval_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    import multilora as ml
    from multilora.data import encode_prompt
    from multilora.evaluate import score_choices
    from multilora.models import embedded_tokenizer, tiny_model
    from multilora.tasks import eval_items

    from conftest import randomize_adapters

    items = eval_items("mmlu_high_school_geography", 3, K_SHOT_ITEMS)
    tokenizer = embedded_tokenizer()
    prompts = [encode_prompt(it.prompt, tokenizer) for it in items]
    shared = min(next((k for k, (a, b) in enumerate(zip(p, prompts[0])) if a != b), len(p)) for p in prompts[1:])
    assert shared >= 150 and len({len(p) for p in prompts}) > 1  # a long shared prefix, then mixed lengths
    torch.manual_seed(0)
    # room for the whole 3-shot prompt; larger random weights than the default 0.02 make a model with opinions
    model = tiny_model("llama", max_position_embeddings=1024, initializer_range=0.3)
    if adapter:
        ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, alpha=8, targets="all-linear"))
        randomize_adapters(model)
    model.eval()

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    task_dir = write_task(tmp_path / "tasks", items, tmp_path / "datasets_cache", K_SHOT_TASK)
    tasks = get_task_dict([K_SHOT_TASK], TaskManager(include_path=str(task_dir), include_defaults=False))
    out = lm_eval_evaluate(lm, tasks, bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"][K_SHOT_TASK], key=lambda s: s["doc_id"])
    assert len(samples) == K_SHOT_ITEMS
    theirs = []
    for it, s in zip(items, samples):
        assert [tuple(a) for a in s["arguments"]] == [(it.prompt, c) for c in it.choices]  # byte-identical requests
        theirs.append([float(r[0]) for r in s["filtered_resps"]])
    their_pred = [max(range(len(ll)), key=ll.__getitem__) for ll in theirs]
    # the answers are decided by more than the tolerance, and the model does not always pick the same letter
    assert min(sorted(ll)[-1] - sorted(ll)[-2] for ll in theirs) > 10 * LL_TOL
    assert len(set(their_pred)) > 1

    for batch_size in (1, 5):
        ours = score_choices(model, tokenizer, items, batch_size=batch_size)
        for o, t in zip(ours, theirs):
            assert o["ll"] == pytest.approx(t, abs=LL_TOL)
        assert [o["pred"] for o in ours] == their_pred
