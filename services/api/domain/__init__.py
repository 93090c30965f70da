"""Pure rules of the API: who may do what, login throttling, infusion clocks for display."""
