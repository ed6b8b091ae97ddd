"""Data for training: VQ codes on disk (``codes``) and the command that extracts them
(``extract_codes``), the emoji image set (``emoji``, ``emoji_package``, ``emoji_examples``)."""
