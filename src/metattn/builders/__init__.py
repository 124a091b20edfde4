"""The built-in config kinds: importing this package registers them with
:mod:`metattn.registry` (each builder's signature, or its options dataclass, is the schema of
its config section). A new kind: a function decorated with ``@register(group, name)`` in a
module imported here (or in your own code, imported before the config is read)."""

from metattn.builders import core, icl, recsys, seq2seq, text, vision

__all__ = ["core", "icl", "recsys", "seq2seq", "text", "vision"]
