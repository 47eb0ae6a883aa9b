"""What is on disk (layer ``format``): the dtype table, the tree codec (nested state <-> JSON skeleton +
named arrays), the streaming safetensors writer and bounded reader, the manifest schema and its
validation, XXH3 hashing, the one set of name rules and the checks of skeleton values.

Imports only ``_util``, ``errors`` and ``policies``. Internal: the public names are re-exported by
``savegame`` (``Manifest``, ``FORMAT_VERSION``)."""
