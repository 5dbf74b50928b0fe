"""`python -m stages.fetch NAME`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
