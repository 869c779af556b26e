"""The one exception type users see.

Anything raised as `EdgevlError` is printed by the CLI as a single sentence and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class EdgevlError(Exception):
    """A problem with the user's input or environment, stated in one sentence."""
