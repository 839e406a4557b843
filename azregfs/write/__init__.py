"""The write path: the write-behind buffer (stage blocks while a file is written, commit
them on close or fsync) and its pure segment map."""
