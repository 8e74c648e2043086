import sys

from q4lab.cli import main

sys.exit(main())
