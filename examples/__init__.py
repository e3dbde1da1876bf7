"""Demo models, configs and a client for the gateway."""
