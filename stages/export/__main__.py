"""`python -m stages.export NAME`: the export of conf/exports/NAME.yaml (stage.py)."""
import sys

from .stage import main

sys.exit(main())
