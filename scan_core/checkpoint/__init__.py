"""Checkpoint files: the self-describing format, strict loaders for published weights
(``loading``: ``load_model``, ``load_tokenizer``, ``save_checkpoint``, ``inspect``, ``convert``,
``average``), container I/O (``files``), foreign layouts (``layouts``); the
``checkpoint`` command (``cli``) and ``ship``, which packages the embedded default."""
