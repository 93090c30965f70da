"""``python -m vigil_tools.healthcheck [SERVICE]``: a container's health, for Docker's HEALTHCHECK.

Asks the service running in this container for its readiness on loopback and exits 0 when it
answers 200, 1 otherwise. The port is the one the service itself reads (its settings, from the
same environment), so the check and the service never disagree: ingest ``/readyz`` on
``VIGIL_INGEST_METRICS_PORT``, rules on ``VIGIL_RULES_OPS_PORT``, notify on
``VIGIL_NOTIFY_OPS_PORT``, the care-team API its login page on ``VIGIL_API_PORT`` (it has no
readiness path). Without SERVICE the container's command (``vigil <service>``, process 1) names
it. The heartbeat publisher has no endpoint: it is healthy while it runs, and notify's heartbeat
watch is what notices it stopped beating; the same goes for one-shot commands.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

SERVED = ("ingest", "rules", "notify", "api")
UNSERVED = ("heartbeat", "migrate", "register-heartbeat")


def health_url(service: str) -> str | None:
    """Where ``service`` answers when it is ready; None for one without an endpoint."""
    if service == "ingest":
        from services.ingest.settings import IngestSettings

        return f"http://127.0.0.1:{IngestSettings().metrics_port}/readyz"
    if service == "rules":
        from services.rules.settings import RulesSettings

        return f"http://127.0.0.1:{RulesSettings().ops_port}/readyz"
    if service == "notify":
        from services.notify.settings import NotifySettings

        return f"http://127.0.0.1:{NotifySettings().ops_port}/readyz"
    if service == "api":
        from services.api.settings import ApiSettings

        return f"http://127.0.0.1:{ApiSettings().port}/login"
    if service in UNSERVED:
        return None
    raise ValueError(f"unknown service {service!r}")


def container_service(cmdline: Path = Path("/proc/1/cmdline")) -> str:
    """The ``vigil`` subcommand process 1 runs (``.../vigil ingest`` -> ``ingest``)."""
    args = [arg for arg in cmdline.read_bytes().decode().split("\0") if arg]
    for arg in args:
        if arg in SERVED or arg in UNSERVED:
            return arg
    raise ValueError(f"process 1 runs no vigil service: {args}")


def check(url: str | None, timeout_s: float = 3.0) -> bool:
    if url is None:
        return True
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    service = args[0] if args else container_service()
    url = health_url(service)
    ok = check(url)
    print(f"{service}: {'ok' if ok else 'not ready'} ({url or 'no endpoint'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
