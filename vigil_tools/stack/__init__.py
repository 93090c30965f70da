"""The local stack: Mosquitto, Kafka (KRaft), PostgreSQL and an SMTP sink, run as plain processes.

Everything a stack owns lives under ``StackSettings().data_dir`` (``.vigil`` by default), so
several stacks (say a developer's and the tests') can run at once on different ports. Use it from
Python::

    from vigil_tools.stack import StackSettings, up, down, status, stack_env
    settings = StackSettings()
    up(settings)
    env = stack_env(settings)

or from a shell: ``python -m vigil_tools.stack up|down [--purge]|status [--json]|env``.
"""

from vigil_tools.stack.cli import add_stack_commands, main
from vigil_tools.stack.mosquitto import (
    add_device_credential,
    revoke_device_credential,
    rotate_device_credential,
)
from vigil_tools.stack.process import StackError
from vigil_tools.stack.settings import StackSettings
from vigil_tools.stack.stack import down, stack_env, status, up

__all__ = [
    "StackError",
    "StackSettings",
    "add_device_credential",
    "add_stack_commands",
    "down",
    "main",
    "revoke_device_credential",
    "rotate_device_credential",
    "stack_env",
    "status",
    "up",
]
