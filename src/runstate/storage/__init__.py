"""Where checkpoint bytes go. Only local (POSIX) disk for now."""

from runstate.storage.local import RunLock, commit_directory, fsync_dir, list_committed, remove_leftovers

__all__ = ["RunLock", "commit_directory", "fsync_dir", "list_committed", "remove_leftovers"]
