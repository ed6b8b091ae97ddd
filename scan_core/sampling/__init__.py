"""Sampling: ``ScanSampler`` (generate, refine, regenerate a region, score) and ``run_all``
in ``sampler``; ``SamplerSettings`` in ``settings``; the ``Trace`` record in ``trace`` and its
reader in ``trace_files``; the pieces the sampler is built from (``canvas``, ``decode``,
``refine``, ``draw``, ``schedule``); the raster baseline (``raster``); and the bulk
``generate`` command with its shards (``shards``)."""
