"""The call path: listener handler, routing, replica handles, the mux client, errors."""
