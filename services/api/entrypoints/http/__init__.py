"""HTTP routes of the API: authentication, patients, alerts, the dashboard."""
