"""`python -m elleci.eval ...` = `elleci eval ...` (see elleci.eval.command)."""
import sys

from .command import main

sys.exit(main())
