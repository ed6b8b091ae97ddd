"""Measuring models: the ``evaluate`` command (``evaluate``, ``sweep``, ``quality``), metrics
on features (``image_metrics``), the feature nets (``classifier``, ``classifier_cli``,
``inception``), report tables (``tables``), the speed benchmark (``bench``, ``bench_report``,
with its roofline: ``roofline``, ``kernels``, and the machine it ran on: ``machine``) and
packaging a model with its card (``ship``)."""
