"""What every service process shares: the gRPC server (health, reflection, drain), the common flags, and `serve`."""
