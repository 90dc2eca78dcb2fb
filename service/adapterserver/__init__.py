"""The adapter server: bottleneck and prefix-tuning adapters (the `adapters` library) served over an
OpenAI-compatible API, from an environment of its own (transformers 4.57). It imports nothing else
from ``service``."""
