import sys

from zray.dashboard.server import main

sys.exit(main())
