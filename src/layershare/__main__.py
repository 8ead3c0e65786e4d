"""`python -m layershare ...` (and `torchrun -m layershare ...`): the command line."""
import sys

from layershare.cli import main

sys.exit(main())
