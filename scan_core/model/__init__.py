"""The SCAN network, with no sampling or training in it: configs and presets (``config``; the
tokenizer's ``VQConfig`` too), layers, the transformer (``network``), the caller-owned KV cache
(``kv_cache``) and the sequence layouts and masks that training and sampling share
(``sequence``). Imports nothing else of scan_core."""
