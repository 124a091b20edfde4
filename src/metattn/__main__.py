import sys

from metattn.cli import main

sys.exit(main())
