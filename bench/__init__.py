"""`make bench`: what the gateway costs per call, beside a direct call, a minimal Python
pass-through proxy and nginx, driven by h2load (see bench/run.py)."""
