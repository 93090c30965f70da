"""Vigil: remote monitoring of home blinatumomab infusions.

This package holds what the services share (settings of the shared infrastructure, the
PostgreSQL migrations, the local stack and the command line). Clinical logic lives in
``services/*/domain``; message contracts live in ``schemas``.
"""
