"""`python -m elleci ...` is the `elleci` command."""
import sys

from elleci.cli import main

sys.exit(main())
