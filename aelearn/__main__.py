import sys

from aelearn.cli import main

sys.exit(main())
