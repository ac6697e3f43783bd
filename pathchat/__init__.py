"""PathChat: talk to a whole-slide image.

Importing the package registers PathChat's model type with transformers' Auto classes, so that
`AutoConfig.from_pretrained(folder)` and `AutoModelForCausalLM.from_pretrained(folder)` load a PathChat
folder. The registration waits for transformers' auto modules to load (`pathchat.model.auto`), so
`import pathchat` itself imports neither torch nor transformers.
"""

from pathchat.model.auto import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()
