"""Two-stage training: align the connector, then instruction-tune connector + LLM (full or LoRA)."""
