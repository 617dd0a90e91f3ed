import sys

from amppatch.cli import main

sys.exit(main())
