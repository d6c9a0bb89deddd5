"""Collection for the doctest run over fedalign/: the Flower apps need the optional extra."""

import importlib.util

# fedalign/flower/apps.py imports flwr (pip install -e ".[flower]"); without it, skip it.
collect_ignore = [] if importlib.util.find_spec("flwr") else ["fedalign/flower/apps.py"]
