"""`python -m data_recipes.tcga_reports REPORTS --out FILE.jsonl [--conversations FILE.jsonl]`."""

import sys

from data_recipes.tcga_reports.recipe import main

sys.exit(main())
