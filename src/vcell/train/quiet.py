"""Keep Lightning's start-up banners and known-harmless warnings out of vcell's output."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_HARMLESS = (
    r".*LeafSpec.*is deprecated",  # torch pytree API change seen by Lightning, not by vcell code
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"You're resuming from a checkpoint that ended before the epoch ended",  # vcell's loaders resume mid-epoch
    r".*does not have many workers.*",  # batches are planned in the main process; workers are optional
)


def _propagates(logger: logging.Logger) -> bool:
    """Whether ``logger``'s records reach the root logger."""
    while logger.parent is not None:
        if not logger.propagate:
            return False
        logger = logger.parent
    return True


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's INFO banners (GPU/TPU available, tips, 'max_steps reached') and the warnings in
    ``_HARMLESS`` off for the duration, unless vcell logs at DEBUG (``vcell -v``)."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    if logging.getLogger("vcell").isEnabledFor(logging.DEBUG):
        # Lightning's own stream handlers would print each line a second time beside vcell's; only
        # where its records also reach the root's handlers (else they would go nowhere)
        own = [list(logger.handlers) for logger in loggers]
        for logger in loggers:
            if logging.getLogger().handlers and _propagates(logger):
                logger.handlers.clear()
        try:
            yield
        finally:
            for logger, handlers in zip(loggers, own):
                logger.handlers[:] = handlers
        return
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _HARMLESS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
