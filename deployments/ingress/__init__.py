"""The router's process: HTTP ingress (FastAPI app, access and admission, OpenAI requests and responses, tool-
call parsing, media fetching and decoding). Never imports torch."""
