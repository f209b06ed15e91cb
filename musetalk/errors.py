"""Typed errors whose messages tell the user what to do next.

Everything the engine raises on bad input or a broken setup derives from
`MuseTalkError`; the CLI prints the message, the panel shows it as a `gr.Error`.
"""

from __future__ import annotations


class MuseTalkError(Exception):
    """Base class: the message is meant for a person, not a traceback reader."""


class MissingWeightsError(MuseTalkError):
    """Weight files are absent, truncated or do not fit the expected architecture."""

    def __init__(self, problems: list[str], models_dir: str, fetch_command: str = "bash download_weights.sh"):
        self.problems = list(problems)
        self.models_dir = models_dir
        self.fetch_command = fetch_command
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"MuseTalk weights in {models_dir} are missing or unusable:\n{listing}\nFetch them with: {fetch_command}"
        )


class MediaError(MuseTalkError):
    """A video or audio file cannot be read or is unsuitable."""


class NoFaceError(MuseTalkError):
    """No usable face where one is required."""


class AvatarError(MuseTalkError):
    """An avatar is missing, corrupt, incompatible or has an invalid name."""


class ConfigError(MuseTalkError):
    """A configuration file or setting is invalid."""


class CapacityError(MuseTalkError):
    """The generation service cannot take another live session in real time."""


class BackendError(MuseTalkError):
    """The chosen generation backend cannot be reached or used."""


class ServiceUnavailableError(MuseTalkError):
    """A speech or language service named in the bot config does not answer, or refuses the key."""


class WeightsError(MuseTalkError):
    """A weight file could not be fetched, or arrived damaged."""


class PreparationCancelled(MuseTalkError):
    """The operator cancelled an avatar preparation; nothing was written."""


class AvatarNotHeldError(MuseTalkError):
    """A generation replica has neither the avatar's bytes nor a shared copy: the caller sends them."""
