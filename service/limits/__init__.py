"""Per-key limits (requests, member tokens, concurrency), in process or shared through Redis."""
