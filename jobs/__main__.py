"""`python -m jobs ...`: the job layer's command line (see jobs/cli.py)."""

import sys

from jobs.cli import main

sys.exit(main())
