"""`bertrec loadtest`: closed- and open-loop gRPC load generation, sweeps and SLO search."""
