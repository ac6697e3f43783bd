"""WSI-VQA -> evaluation-questions JSONL (see README.md)."""
