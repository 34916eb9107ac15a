"""The ``rep-pipeline`` command line (typer): parses options, calls a stage, prints a summary."""
