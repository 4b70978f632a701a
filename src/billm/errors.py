"""Exceptions raised by billm. Every user-facing failure is a :class:`BillmError`."""


class BillmError(Exception):
    """Base class: a clear, user-facing error (bad input, unsupported model, ...)."""


class DataError(BillmError):
    """A dataset could not be found or has too little text for the request."""


class ModelError(BillmError):
    """A model could not be loaded, or its structure is not supported."""


class QuantizationError(BillmError):
    """Quantization failed (non-finite weights, a Hessian that cannot be factored, ...)."""


class CheckpointError(BillmError):
    """A checkpoint folder is missing, incomplete, corrupt, or of an unsupported format version."""
