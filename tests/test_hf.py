"""An injected model trains under transformers.Trainer and TRL's SFTTrainer; checkpoints are adapter-only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import multilora as ml
from multilora.hf import MultiLoRACallback, remove_full_weights
from multilora.models import embedded_tokenizer, tiny_model

TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Two plus two equals four.",
    "Water boils at one hundred degrees.",
]
MAX_LEN = 16
STEPS = 12


def base_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny_model("llama")


def injected_model() -> torch.nn.Module:
    model = base_model()
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, alpha=8, targets="all-linear"))
    return model


def batch(tok) -> dict[str, torch.Tensor]:
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@torch.no_grad()
def lm_loss(model, b) -> float:
    model.eval()
    return model(**b).loss.item()


@torch.no_grad()
def logits(model, b) -> torch.Tensor:
    model.eval()
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def assert_adapter_only_checkpoint(out: Path, model, b) -> Path:
    """The last checkpoint holds only lora_ tensors, and load_adapter restores identical logits."""
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, f"no checkpoint in {out}"
    ckpt = ckpts[-1]
    files = [f for f in ckpt.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pth")
             and f.name not in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")]
    assert [f.relative_to(ckpt).as_posix() for f in files] == ["adapter/adapter.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_s") for k in keys)
    assert set(keys) == set(ml.adapter_parameters(model))
    fresh = ml.load_adapter(base_model(), ckpt / "adapter")
    torch.testing.assert_close(logits(fresh, b), logits(model, b), rtol=0, atol=0)
    return ckpt


def test_trainer_lowers_loss_and_saves_adapter_only_checkpoints(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    tok = embedded_tokenizer()
    model, b = injected_model(), batch(tok)
    before = lm_loss(model, b)
    ds = Dataset.from_dict({k: v.tolist() for k, v in b.items()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=STEPS // 2, logging_steps=STEPS, report_to=[], use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                      callbacks=[MultiLoRACallback()])
    trainer.train()
    after = lm_loss(model, b)
    assert after < before - 0.1, (before, after)
    assert_adapter_only_checkpoint(tmp_path, model, b)
    assert len(list(tmp_path.glob("checkpoint-*/adapter/adapter_config.json"))) == 2


def test_sft_trainer_lowers_loss_and_saves_adapter_only_checkpoints(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = embedded_tokenizer()
    model, b = injected_model(), batch(tok)
    before = lm_loss(model, b)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=STEPS, logging_steps=STEPS, report_to=[], use_cpu=True,
        seed=0, max_length=MAX_LEN, packing=False, bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tok, callbacks=[MultiLoRACallback()])
    trainer.train()
    after = lm_loss(model, b)
    assert after < before - 0.1, (before, after)
    assert_adapter_only_checkpoint(tmp_path, model, b)


def test_full_weight_checkpoints_load_plainly_and_as_the_best_model(tmp_path):
    """keep_full_weights=True: each checkpoint's model.safetensors loads with a plain from_pretrained (base
    weights under their own names), and load_best_model_at_end puts the best checkpoint's adapter back."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    tok = embedded_tokenizer()
    model, b = injected_model(), batch(tok)
    ds = Dataset.from_dict({k: v.tolist() for k, v in b.items()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        logging_steps=4, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, data_collator=default_data_collator,
                      callbacks=[MultiLoRACallback(keep_full_weights=True)])
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    torch.testing.assert_close(logits(model, b), logits(ml.load_adapter(base_model(), best / "adapter"), b),
                               rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(best).eval()
    torch.testing.assert_close(logits(plain, b), logits(base_model(), b), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["no adapter", "load_best_model_at_end"])
def test_callback_refuses_what_it_cannot_checkpoint(tmp_path, case):
    from transformers import Trainer, TrainingArguments

    extra = {"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"}
    extra = {} if case == "no adapter" else extra
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, **extra)
    data = [{"input_ids": [1, 2], "labels": [1, 2]}]
    trainer = Trainer(model=base_model() if case == "no adapter" else injected_model(), args=args,
                      train_dataset=data, eval_dataset=data, callbacks=[MultiLoRACallback()])
    with pytest.raises(ml.MultiLoRAError, match="inject" if case == "no adapter" else "load_best_model_at_end"):
        trainer.train()


def test_remove_full_weights_keeps_other_files(tmp_path):
    names = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "config.json", "tokenizer.json", "trainer_state.json", "optimizer.pt"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert remove_full_weights(tmp_path) == sorted(names[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[4:])
