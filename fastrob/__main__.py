import sys

from fastrob.cli import main

sys.exit(main())
