"""Package data: the built-in model (default_model/, see pathchat.model.builtin)."""
