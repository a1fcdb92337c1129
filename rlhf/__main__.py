"""`python -m rlhf` is `python -m rlhf.train` (all three stages)."""
import sys

from rlhf.train import main

sys.exit(main())
