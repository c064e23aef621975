import sys

from rsviewer.cli.main import main

sys.exit(main())
