"""The filesystem the kernel sees: the FUSE operations (thin: they translate), the namespace
(inodes, paths, attributes, lookups), directory listings and markers, what this mount knows
about its own directories, the file types beyond regular files, and the control files."""
