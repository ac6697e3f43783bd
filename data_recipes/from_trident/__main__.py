"""`python -m data_recipes.from_trident JOB --out FEATURES_DIR [--encoder NAME] [--mpp 0.25 | --mpp-table CSV]`."""

import sys

from data_recipes.from_trident.convert import main

sys.exit(main())
