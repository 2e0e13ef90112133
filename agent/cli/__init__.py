"""Every command line: ``keyagent COMMAND`` (main.py) and one module per command, imported lazily."""
