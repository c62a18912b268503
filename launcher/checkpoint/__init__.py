"""The run folder on disk: checkpoint files, restoring from them, the folder's lock, and the
writable checks made before anything is written."""
