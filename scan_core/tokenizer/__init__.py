"""The LlamaGen VQ tokenizer (``vq.VQModel``): images <-> grids of codes. Its layers are in
``blocks``; its config and presets are ``model.config.VQConfig`` and ``vq_preset``."""
