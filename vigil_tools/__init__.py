"""Vigil's tools, the top layer: the command line, the local stack, the device simulator, the
pipeline heartbeat, replay and the container health check.

Tools may import the services (``services``) and the core (``vigil``); nothing below imports a
tool (``tests/unit/test_layers.py``).
"""
