"""The start-up summary: what is being served, where, and whether keys are required."""

from __future__ import annotations

from service.config import GatewayConfig


def _where(config: GatewayConfig, name: str) -> str:
    member = config.member(name)
    return f"server {member.server}" if member.server is not None else f"endpoint {member.endpoint}"


def startup_summary(
    config: GatewayConfig,
    health: dict[str, str | None],
    base_url: str,
    seconds: float,
    version: str,
    ops_url: str | None = None,
) -> str:
    """Several lines for a person: each ensemble with its members (kind, where, state), its ranker,
    fuser and fusion policy; the URLs of the API, docs, status page and metrics (``ops_url``: on the
    operators' port); whether a key is needed. ``health``: each member's error, None when it is up."""
    lines = [f"ensemble-gateway {version} ready in {seconds:.1f}s"]
    for name, ens in config.ensembles.items():
        default = " (default)" if name == config.default else ""
        parts = [f"ranker {ens.ranker or '-'}", f"fuser {ens.fuser or '-'}"]
        if ens.fuser is not None:
            parts.append(f"fusion {ens.fusion}, fuse_top_k {ens.fuse_top_k}")
        lines.append(f"  ensemble {name}{default}: {', '.join(parts)}")
        for m in ens.members:
            error = health.get(m)
            state = "up" if m in health and error is None else f"DOWN ({error})" if error else "unknown"
            lines.append(f"    {m:<20} {config.member(m).kind:<12} {_where(config, m):<36} {state}")
    keys = config.auth.client_keys()
    needed = f"required ({len(keys)} configured)" if keys else "not required: the API is open"
    admin = "enabled" if config.auth.admin_key() else "disabled (no admin key)"
    lines += [
        f"  API       {base_url}/v1 (OpenAI: chat/completions, completions, responses, models), {base_url}/generate",
        f"  docs      {base_url}/docs",
        f"  status    {ops_url or base_url}/",
        f"  metrics   {ops_url or base_url}/metrics",
        f"  API keys  {needed}; admin API {admin}",
    ]
    return "\n".join(lines)
