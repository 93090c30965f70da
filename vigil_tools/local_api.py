"""The care-team API as ``vigil run`` starts it: ``vigil api serve`` given the local stack's
broker accounts (its Mosquitto's password file and client-id bindings, as ``vigil admin`` uses
them) and the stack's TLS listener and test CA as where devices connect, so registering a
device from the dashboard or the API creates an account the device can connect with.

The API itself imports no tool: the accounts are handed to ``create_app`` from here. Run as
``python -m vigil_tools.local_api`` with the stack's environment (``VIGIL_STACK_*``, and the
``VIGIL_API_*`` / ``VIGIL_PG_*`` settings ``vigil api`` reads).
"""

from __future__ import annotations

from services.api.app import serve
from services.api.settings import ApiSettings
from vigil.runtime import configure_logging
from vigil_tools.admin import local_broker_endpoint
from vigil_tools.stack.accounts import LocalStackBroker
from vigil_tools.stack.settings import StackSettings


def main() -> int:
    settings = ApiSettings()
    configure_logging(settings.log_level)
    stack = StackSettings()
    serve(
        settings,
        broker_accounts=LocalStackBroker(stack),
        broker_endpoint=local_broker_endpoint(stack),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
