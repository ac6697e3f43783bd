"""Training data: conversation records over cached feature files, rendered, batched and packed."""
