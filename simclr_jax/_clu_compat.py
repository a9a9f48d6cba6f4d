"""Lets clu's metric writers import without TensorFlow.

clu.metric_writers (and everything that imports it: clu.periodic_actions, its logging, async
and multi writers) imports its TensorBoard SummaryWriter, and with it TensorFlow, the moment
the package loads. That would make TensorFlow a hard dependency of training even on the TF-free
path (data.backend='jax'), and on GPU hosts TensorFlow is often absent or clashes with JAX's
CUDA libraries. So before clu loads we register a stand-in for that one module whose
SummaryWriter imports the real one (clu.metric_writers.tf.summary_writer) only when a
TensorBoard writer is actually built. Everything else in clu is untouched.
"""

from __future__ import annotations

import sys
import types

_MODULE = "clu.metric_writers.summary_writer"


class _DeferredSummaryWriter:
    """clu's TensorBoard SummaryWriter, imported (with TensorFlow) when first constructed."""

    def __new__(cls, *args, **kwargs):
        from clu.metric_writers.tf.summary_writer import SummaryWriter

        return SummaryWriter(*args, **kwargs)


def defer_tensorflow_summary_writer() -> None:
    """Registers the stand-in unless clu's writers were already imported (then it is moot)."""
    if _MODULE in sys.modules or "clu.metric_writers" in sys.modules:
        return
    module = types.ModuleType(_MODULE, __doc__)
    module.SummaryWriter = _DeferredSummaryWriter
    sys.modules[_MODULE] = module
