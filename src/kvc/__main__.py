import sys

from kvc.cli import main

sys.exit(main())
