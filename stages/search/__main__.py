"""`python -m stages.search NAME [--worker]`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
