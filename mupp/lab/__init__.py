"""The experiment layer on top of the library: everything ``mupp``'s command-line tool runs.

- :mod:`~mupp.lab.config` — a run's :class:`~mupp.lab.config.TrainConfig`, config files,
  the shipped presets (``mupp/lab/presets``);
- :mod:`~mupp.lab.data` — CIFAR-10/100 (npz or the python layout) and synthetic data;
- :mod:`~mupp.lab.train` — one resumable training run (:mod:`~mupp.lab.checkpoint`);
- :mod:`~mupp.lab.vectorized` — K learning rates and radii of one MLP trained at once;
- :mod:`~mupp.lab.sweep` — grid sweeps through Optuna storage (resumable, multi-worker);
- :mod:`~mupp.lab.analysis`, :mod:`~mupp.lab.confidence` — transfer tables with statistics
  over seeds; :mod:`~mupp.lab.plots` — their figures;
- :mod:`~mupp.lab.checks`, :mod:`~mupp.lab.statistics` — coordinate checks and Fig. H.1
  statistics of the built-in models;
- :mod:`~mupp.lab.cli`, :mod:`~mupp.lab.commands` — the ``mupp`` command.

Imports go one way: the lab imports the library (``mupp.shapes``, ``mupp.optim``,
``mupp.models``, ``mupp.diagnostics``, ...), never the reverse.  ``import mupp`` does not load
this package or its dependencies (Optuna, matplotlib, SciPy).
"""
