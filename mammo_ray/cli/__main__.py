"""``python -m mammo_ray.cli``: the ``mammo-ray`` console script."""

import sys

from mammo_ray.cli.app import main

sys.exit(main())
