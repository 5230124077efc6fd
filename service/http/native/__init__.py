"""The service's own HTTP API: /classify and /embed (multipart uploads), /model, health, metrics."""
