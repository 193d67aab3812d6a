"""``python -m apa`` (and ``torchrun ... -m apa align``): the `apa` command."""

import sys

from apa.cli import main

sys.exit(main())
