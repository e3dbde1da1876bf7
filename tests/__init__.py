
from gateway.event_loop import disarm_fork_handlers

# As `gateway run` does (gateway/cli.py), before grpc is imported: the in-process gateways run
# on uvloop, whose spawn of a process (a replica, a CLI) crashes it now and then with grpc's
# fork handlers armed.
disarm_fork_handlers()
