"""Routers: they translate HTTP to pipeline calls and back, nothing more."""
