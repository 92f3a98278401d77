"""Jobs: prune, merge, evaluate and run, each with one typed config shared by the CLI, recipes and the Python API."""
