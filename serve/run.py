"""Entry script: `python serve/run.py [--model CKPT] [--slides DIR] ...` is `pathchat serve ...`."""

import sys

from pathchat.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
