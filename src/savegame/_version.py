"""The package version, in a module of its own so that any layer can record it (the writer puts it in
every manifest) without importing the package's ``__init__`` (which imports every layer: a cycle)."""

__version__ = "0.1.0"
