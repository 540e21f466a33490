"""The way in and out of softflow: configs, the run driver, the ``softflow`` command, sweeps, and the gRPC policy
server (serve.py) and client (client.py). ``softflow.deploy.PolicyClient`` is imported on first use, so the rest
of the package does not pay for grpc."""


def __getattr__(name: str):
    if name == "PolicyClient":
        from softflow.deploy.serve.client import PolicyClient

        return PolicyClient
    raise AttributeError(f"module 'softflow.deploy' has no attribute {name!r}")
