"""`python -m data_recipes.synthetic build --out DIR [--train N --heldout M --seed S --encoder NAME]`."""

import sys

from data_recipes.synthetic.cli import main

sys.exit(main())
