"""Training the VQ tokenizer: the ``train_vq`` command (``train``), its state, the
adversarial loss and codebook upkeep."""
