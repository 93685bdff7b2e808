"""The `safehaven` command, one module per area (main: the group and `run`)."""
