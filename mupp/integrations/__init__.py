"""Bridges to training frameworks.  Each module imports its framework on import, never
``import mupp``: :mod:`mupp.integrations.huggingface` (``SAMTrainer``).  Lightning needs no
bridge: return :class:`mupp.SAM` from ``configure_optimizers`` (automatic optimization runs both
passes through the closure), or see the README for manual optimization."""
