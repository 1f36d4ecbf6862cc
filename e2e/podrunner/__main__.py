import sys

from dsv4.e2e.podrunner.runner import main

sys.exit(main())
