"""The demo and what it shares with the tests: a local Azurite, OCI image layouts, the
registry process, and the demo command itself. Not on the request path."""
