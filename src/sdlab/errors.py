"""The errors sdlab reports to a user as one clear line (the CLI exits with code 2 on them).

All are ValueError subclasses, so callers that already catch ValueError keep working.
"""
from __future__ import annotations


class SdlabError(ValueError):
    """Bad input or a missing resource, described in one line."""


class InputError(SdlabError):
    """A user setting or input that sdlab cannot use (bad steps, sizes, seed, sampler name...)."""


class ModelLoadError(SdlabError):
    """A model path, file or key layout sdlab cannot load; the message names what is missing."""
