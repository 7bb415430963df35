import sys

from facestream.cli import main

sys.exit(main())
