"""``python -m minunet``: see :mod:`minunet.cli`."""

import sys

from minunet.cli import main

sys.exit(main())
