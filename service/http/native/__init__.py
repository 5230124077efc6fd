"""The service's own HTTP API: /classify, /embed and /explain (multipart uploads), /model, health, metrics."""
