"""commute: a checkpoint analyzer for multi-domain training.

The Lie-bracket criterion of "Commute your domains" (``../shared/paper.md``), with the signs and
constants of MATH.md, evaluated at saved checkpoints from gradients and Hessian-vector products.
"""

__version__ = "0.1.0"
