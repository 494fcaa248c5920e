import sys

from rnp_fast.cli import main

sys.exit(main())
