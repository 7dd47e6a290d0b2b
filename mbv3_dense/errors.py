"""The kind of error a user fixes by changing an input, not the code.

Every error class that names a file, a key or a value the user gave (a checkpoint that does not fit, an
annotation entry, a mask value, a class list) also derives from :class:`InputError`, so that the command
line shows it as one line, ``error: <message>`` (exit status 2), instead of a traceback.
"""


class InputError(Exception):
    """A problem with what the user gave (a file, a key, a value); the message names it and says what is wrong."""
