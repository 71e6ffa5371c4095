"""The model replica's Ray Serve shell over the engine, and the chat-affinity request router."""
