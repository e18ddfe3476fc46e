"""commute: a checkpoint analyzer for multi-domain training.

The Lie-bracket criterion of "Commute your domains" (summarised in ``docs/MATH.md``), with the
signs and constants of docs/MATH.md, evaluated at saved checkpoints from gradients and
Hessian-vector products.
"""

__version__ = "0.1.0"
