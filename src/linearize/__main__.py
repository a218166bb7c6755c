"""`python -m linearize ...` (and `torchrun ... -m linearize run ...`): the `linearize` command."""

import sys

from linearize.cli import main

sys.exit(main())
