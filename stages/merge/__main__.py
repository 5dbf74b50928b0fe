"""`python -m stages.merge NAME`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
