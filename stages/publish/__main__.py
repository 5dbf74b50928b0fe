"""`python -m stages.publish TARGET`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
