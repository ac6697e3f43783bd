"""python -m data_recipes.pathvqa SOURCE --out OUT.jsonl"""

import sys

from pathchat.evaluation.tasks import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("pathvqa", "PathVQA QA_pairs_*.json -> evaluation-questions JSONL"))
