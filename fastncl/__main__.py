import sys

from fastncl.cli import main

sys.exit(main())
