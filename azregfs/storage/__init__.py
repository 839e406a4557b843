"""Azure Blob Storage: the driver (every SDK call and the errno mapping live there, nowhere
else), List Blobs parsing, throttling, single-flight of requests and the memory of failed
ones."""
