"""The one exception type fxquant raises for bad input, so callers can catch it."""


class FxQuantError(ValueError):
    """Bad input or an unsupported graph; the message names the argument or node and the fix."""
