"""`python -m benchmarks`: the same as `l7fp bench`."""

import sys

from benchmarks.cli import main

sys.exit(main())
