"""Serving trained policies over gRPC: the server (server.py), the policy it wraps (policy.py), the client
(client.py) and the protocol (proto/)."""
