"""The model store's errors (a module of its own so that light commands need not import
resolve.py, which imports torch)."""


class ModelStoreError(Exception):
    """Base of the model store's errors."""


class UnknownModelError(ModelStoreError, ValueError):
    """A spec that is none of the accepted forms (a usage error)."""


class ModelNotFoundError(ModelStoreError, RuntimeError):
    """A recognised spec whose files cannot be had (package missing, offline, download failed)."""
