"""`python -m socksd` is the `socksd` command."""

import sys

from socksd.cli import main

sys.exit(main())
