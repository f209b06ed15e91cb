"""Prepared avatars: preparation from a video and the atomic on-disk store."""

from musetalk.avatar.store import Avatar, AvatarManifest, AvatarStore, validate_name

__all__ = ["Avatar", "AvatarManifest", "AvatarStore", "validate_name"]
