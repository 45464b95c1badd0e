"""`python -m edgeddl` is the `edgeddl` command."""

import sys

from edgeddl.cli.main import main

sys.exit(main())
