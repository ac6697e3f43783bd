"""`import pathchat` registers the "pathchat" model type with transformers' Auto classes, lazily.

Registering needs PathChat's config and model classes, and importing them loads torch and transformers
(seconds), which the slide tools that also import `pathchat` never need. So `import pathchat` only
installs post-import hooks (wrapt's implementation of PEP 369) on transformers' own auto modules: when
`transformers.models.auto.configuration_auto` loads, `pathchat.model.configuration` is imported and
registers `AutoConfig`; when `...modeling_auto` loads, `pathchat.model.modeling` is imported and
registers `AutoModelForCausalLM` and `AutoModelForImageTextToText`. Both happen before any Auto class
can look the type up, whichever of `import pathchat` and `import transformers` comes first.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

#: transformers module -> the PathChat module whose import registers the Auto classes it defines.
AUTO_HOOKS = {
    "transformers.models.auto.configuration_auto": "pathchat.model.configuration",
    "transformers.models.auto.modeling_auto": "pathchat.model.modeling",
}


def _import_when_loaded(module_name: str) -> Callable[[object], None]:
    def hook(_loaded: object) -> None:
        # Already imported, or being imported (its own `from transformers import ...` loaded the auto
        # module): its last lines register it, so importing it again here would only see half a module.
        if module_name not in sys.modules:
            importlib.import_module(module_name)

    return hook


def register_auto_classes() -> None:
    """Install the hooks (`pathchat/__init__.py` does, once per process); an auto module already loaded
    runs its hook at once, and a second call only adds hooks that find their module imported."""
    import wrapt

    for target, module_name in AUTO_HOOKS.items():
        wrapt.register_post_import_hook(_import_when_loaded(module_name), target)
