"""PathVQA question/answer pairs -> evaluation-questions JSONL (see README.md)."""
