"""One exception base class for every error attnlab raises on purpose.

Each message is one line that names what is wrong and the fix. The CLI catches `AttnlabError`
and prints that line (`--debug` or ATTNLAB_DEBUG=1 shows the traceback instead). Subclasses keep
a builtin base where callers relied on it (ValueError, FileNotFoundError, RuntimeError).
"""

from __future__ import annotations


class AttnlabError(Exception):
    """Base class: a clear, expected failure (bad config, bad data, damaged file, wrong base)."""


class ConfigError(AttnlabError, ValueError):
    """A config that cannot run; the message names the key, the value and what is expected."""


class DataError(AttnlabError, ValueError):
    """Data that cannot be used as given (a folder for a file, a bad column mapping)."""


class DamagedFile(AttnlabError, ValueError):
    """A checkpoint, cache entry or artifact whose bytes do not match its checksum manifest."""


class UnsafePath(AttnlabError, ValueError):
    """A write or delete that would leave the run folder (or remove a folder attnlab did not create)."""
