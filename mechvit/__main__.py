"""``python -m mechvit`` (and ``torchrun ... -m mechvit``) is the ``mechvit`` command."""

import sys

from mechvit.cli import console_main

sys.exit(console_main())
