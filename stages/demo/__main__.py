"""`python -m stages.demo OUT_DIR`: see stage.py."""
import sys

from .stage import main

sys.exit(main())
