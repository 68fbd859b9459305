"""`policyplug serve`: the decision service (server.py) and its transports (socket_transport.py,
component.py), with metrics (metrics.py)."""
