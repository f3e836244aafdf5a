"""``python -m curation.cli``: the same entry point as the ``curate`` script."""

import sys

from curation.cli.main import main

sys.exit(main())
