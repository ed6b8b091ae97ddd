"""Measuring models: the ``evaluate`` command (``evaluate``, ``sweep``, ``quality``), metrics
on features (``image_metrics``), the feature nets (``classifier``, ``inception``), report tables
(``tables``) and the speed benchmark (``bench``, ``bench_report``)."""
