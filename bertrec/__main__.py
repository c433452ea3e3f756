import sys

from bertrec.cli import main

sys.exit(main())
