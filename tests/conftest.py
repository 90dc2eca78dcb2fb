"""tests/adapters/ runs in the adapter server's own environment (.venv-adapters, where the `adapters`
library and transformers 4.57 are): `make test` runs it there with that interpreter, and the main
environment, which cannot import them, leaves it to that run."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("adapters") else ["adapters"]
