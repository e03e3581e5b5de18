import sys

from rbit.cli import main

sys.exit(main())
