"""Care-team API and dashboard: who is in trouble now, acknowledge, a child's last hours.

Every query is scoped to the caller's care teams; patient data is PHI.
"""
