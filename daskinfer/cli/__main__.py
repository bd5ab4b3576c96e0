import sys

from daskinfer.cli.main import main

sys.exit(main())
