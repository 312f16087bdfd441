"""multilora: multi-task fine-tuning of Hugging Face causal LMs with MultiLoRA."""

__version__ = "0.1.0"
