"""MiniCPM-V 4.6 on Ray Serve: the router, the model replicas and what they share."""
