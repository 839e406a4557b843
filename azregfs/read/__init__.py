"""The read path: the block cache (memory, optional disk tier), read-ahead and the pinned
whole versions of small files."""
