"""`python -m data_recipes.slideinstruction CONVERSATIONS --csv-dir DIR --out-conversations FILE --out-features DIR`."""

import sys

from data_recipes.slideinstruction.convert import main

sys.exit(main())
