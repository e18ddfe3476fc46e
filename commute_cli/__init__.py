"""commute: a checkpoint analyzer for multi-domain training.

The Lie-bracket criterion of "Commute your domains" (summarised in ``docs/MATH.md``), with the
signs and constants of docs/MATH.md, evaluated at saved checkpoints from gradients and
Hessian-vector products.
"""

import time as _time

__version__ = "0.1.0"

__started__ = _time.perf_counter()
"""When this process imported commute (``time.perf_counter``): ``analyze --dry-run`` counts the start-up
(imports, input checks) it measured into the time it announces, since the real run pays it too."""
