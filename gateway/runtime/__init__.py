"""The local replica process: the user's servicer, its mux server, its reports."""
