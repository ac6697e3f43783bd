"""python -m data_recipes.wsi_vqa SOURCE --out OUT.jsonl"""

import sys

from pathchat.evaluation.tasks import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("wsi-vqa", "WSI-VQA WsiVQA_{train,test}.json -> evaluation-questions JSONL"))
