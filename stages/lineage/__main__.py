"""`python -m stages.lineage NAME`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
