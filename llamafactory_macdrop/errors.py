"""One family for every error a user should read as one line (standard library only).

Why: every MacDrop verdict (a key out of range, a storage no backend handles, a prefix the
tokenizer cannot give, an adapter for another base, ...) is printed as ONE line and ends the
command (``macdrop: error: ...``, exit 2) or the training run (``[macdrop] error: ...``, on every
rank at once). The CLI and the launcher catch :class:`MacDropError`, nothing else; each module
keeps its own subclass (``AttackError``, ``LocatorError``, ...) so callers can still tell them
apart, and each also derives from the builtin it always was (``ValueError`` for bad input,
``RuntimeError`` for a state, ``FileNotFoundError`` for a missing model), so existing
``except ValueError`` code keeps working. Anything that is not a MacDropError is a bug and keeps
its traceback.
"""


class MacDropError(Exception):
    """A user-facing MacDrop error: its message is one line that names the key or value and what is allowed."""
