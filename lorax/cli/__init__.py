"""The Typer front end: one module per command, each a thin wrapper over a service."""
