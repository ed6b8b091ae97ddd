"""Training the transformer: the objective (``losses``, ``negatives``), the loop (``loop``),
its durable state (``state``), reporting (``report``), multi-process set-up (``distributed``),
small metrics (``metrics``) and the ``train`` command (``train``). The VQ tokenizer's
training is the ``vq`` package."""
