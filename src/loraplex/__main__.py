"""`python -m loraplex ...` (also what `torchrun -m loraplex train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
