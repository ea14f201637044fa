"""Run-time machinery: device and distributed setup, the training loop, EMA, checkpoints, logging.

Everything device-specific goes through :mod:`bevnext.engine.device`; everything about process
groups through :mod:`bevnext.engine.dist`. The package re-exports exactly the public names of those two
modules (their ``__all__``), so each name is declared once, where it is defined; the training modules
(``trainer``, ``checkpoint``, ``ema``, ``schedule``, ``metrics``, ``environment``) are imported by path.
"""

from bevnext.engine import device, dist
from bevnext.engine.device import *  # noqa: F403
from bevnext.engine.dist import *  # noqa: F403

__all__ = [*device.__all__, *dist.__all__]
