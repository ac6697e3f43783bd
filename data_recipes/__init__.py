"""Dataset builders: each sub-package turns a published dataset into PathChat's conversation and feature files.

Run one with `python -m data_recipes.<name> --help` from the repository root; each folder's README gives
its source, licence and exact commands.
"""
