"""python -m data_recipes.slidebench SOURCE --out OUT.jsonl"""

import sys

from pathchat.evaluation.tasks import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("slidebench", "SlideBench-VQA (TCGA) JSON or official CSV -> evaluation-questions JSONL"))
