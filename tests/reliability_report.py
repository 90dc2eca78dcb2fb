"""Turn the rows the fault and load tests recorded (JSON lines) into docs/RELIABILITY.md.

python -m tests.reliability_report .cache/reliability.jsonl docs/RELIABILITY.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _errors(row: dict[str, Any]) -> str:
    return ", ".join(f"{n}×{code}" for code, n in row["errors"].items()) or "0"


def render(rows: list[dict[str, Any]]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Reliability figures",
        "",
        "Written by `make reliability` (the fault and load tests at full size, "
        "`RELIABILITY_FULL=1`); `make test` runs the same scenarios smaller. "
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}; "
        f"commit `{_commit()}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Every request ends in one bucket: answered (200), a clear error (an HTTP status with an "
        "OpenAI-shaped JSON body), refused (connection refused: never accepted), lost (accepted, then no "
        "usable answer) or hung (no answer by its deadline plus one second). Lost and hung must be 0. "
        "Degraded: answered, but a member, the ranker or the fuser failed (`degraded: true`). "
        "Latencies are client-side, for answered requests.",
        "",
        "| Scenario | Injected | Load | Sent | Answered | Degraded | Errors | Refused | Lost | Hung "
        "| p50 ms | p99 ms | Reproduce |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['injected']} | {r['load']} | {r['sent']} | {r['answered']} | {r['degraded']} "
            f"| {_errors(r)} | {r['refused']} | {r['lost']} | {r['hung']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| `{r['command']}` |"
        )
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['name']}: {r['note']}" for r in notes]
    for r in rows:
        if r["name"].startswith("overload"):
            lines += [
                "",
                "## Overload",
                "",
                f"{r['injected']}. Admitted requests: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms. "
                f"Shed with 429 and `Retry-After`: {r['shed']} of {r['sent']}, client-side latency "
                f"p50 {r['shed_p50_ms']} ms, p99 {r['shed_p99_ms']} ms (the load generator shares the "
                "machine's cores with the gateway and the stub server).",
            ]
        if r["name"] == "soak":
            lines += [
                "",
                "## Soak",
                "",
                f"{r['load']}: gateway resident memory {r['rss_start_mib']} MiB after the warm-up, "
                f"{r['rss_end_mib']} MiB at the end: {r['rss_growth_pct']:+.2f}% (limit: under 5%). "
                f"Throughput {r['rps']} requests/s on one gateway worker with 4 members per request.",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    if not rows:
        sys.exit(f"{src}: no rows recorded")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(render(rows))
    print(f"wrote {dst}: {len(rows)} scenarios")


if __name__ == "__main__":
    main()
