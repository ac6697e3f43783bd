"""SlideBench-VQA (TCGA) -> evaluation-questions JSONL (see README.md)."""
