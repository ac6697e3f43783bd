"""Which model a verb uses when the user names none.

The built-in model is SmolLM2-135M-Instruct with a shipped connector and LoRA adapter
(`pathchat.model.builtin`, package data). Until that is present, the fallback is the tiny demo
model of the synthetic recipe, trained once (about 8 minutes on 2 cores) into the cache; training
it needs the repository's `data_recipes/`, so an installed package without the shipped weights
says what to do instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pathchat.utils.cache import cache_dir

__all__ = ["BUILTIN_NAME", "demo_model_dir", "resolve_checkpoint"]

BUILTIN_NAME = "builtin"


def _shipped() -> Path | None:
    try:
        from pathchat.model.builtin import builtin_model_dir
    except ImportError:
        return None
    return builtin_model_dir()


def demo_model_dir(learn_cfg: Any) -> Path:
    """Cache folder of the tiny demo model for this recipe config (another config trains another)."""
    key = hashlib.sha256(json.dumps(asdict(learn_cfg), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir("demo-models") / f"demo-model-{key}"


def tiny_demo_checkpoint(learn_cfg: Any = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The tiny demo checkpoint and its learnability summary; trains it once when not cached.

    Raises:
        RuntimeError: not cached and the synthetic recipe (`data_recipes/`) is not importable.
    """
    checkout = Path(__file__).resolve().parents[2]  # an editable install runs from the repository
    if (checkout / "data_recipes" / "synthetic" / "learn.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    try:
        import data_recipes.synthetic.learn as learn
    except ImportError as e:
        raise RuntimeError("no built-in model is installed and the tiny demo model cannot be trained "
                           "outside the repository (it needs data_recipes/): pass --model CHECKPOINT") from e
    cfg = learn_cfg if learn_cfg is not None else learn.LearnConfig()
    folder = demo_model_dir(cfg)
    summary_file = folder / "learnability.json"
    if summary_file.is_file() and (folder / "instruct" / "config.json").is_file():
        return folder / "instruct", json.loads(summary_file.read_text())
    print(f"no built-in model yet: training the tiny demo model into {folder} "
          "(once; about 8 minutes on 2 cores) ...", flush=True)
    summary = learn.run_learnability(folder, cfg, progress=progress)
    return folder / "instruct", summary


def resolve_checkpoint(model: str | Path | None, progress: bool = True) -> Path:
    """The checkpoint folder a verb loads: `model` if given, else the built-in model.

    Raises:
        FileNotFoundError: `model` names no folder.
    """
    if model is not None and str(model) != BUILTIN_NAME:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--model {model}: no such checkpoint folder")
        return path
    shipped = _shipped()
    if shipped is not None:
        return shipped
    return tiny_demo_checkpoint(progress=progress)[0]
