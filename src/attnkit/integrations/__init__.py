"""Bridges to other libraries. Nothing here is imported by ``import attnkit``.

- ``attnkit.integrations.transformers``: attnkit as an attention backend of Hugging Face
  transformers models (``register()``, then ``attn_implementation="attnkit"``). Needs the
  optional extra ``attnkit[transformers]``.
"""
