"""PathChat: talk to a whole-slide image."""

__version__ = "0.1.0"
