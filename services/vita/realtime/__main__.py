import sys

from vita.realtime.server import main

sys.exit(main())
