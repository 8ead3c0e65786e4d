"""`python -m layershare ...` (and `torchrun -m layershare ...`): the command line."""
import sys

from .cli import main

sys.exit(main())
