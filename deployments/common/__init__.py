"""What the router's and the replicas' processes share: types, errors, configuration, digests, the LRU, metrics
and the media handoff. Imports neither torch nor the engine."""
