"""HTTP and WebSocket routes of the gateway: jobs (submit/state/result), ws (events), status."""
