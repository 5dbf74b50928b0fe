"""`python -m stages.compose [--check] [OVERRIDE ...]`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
