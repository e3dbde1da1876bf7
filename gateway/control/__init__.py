"""The control plane: goal state to running, health-checked replicas."""
