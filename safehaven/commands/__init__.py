"""Sub-commands of the ``safehaven`` CLI, one module per governance area.

Each module defines ``register(main: click.Group) -> None``; ``safehaven.cli`` calls them all.
"""
