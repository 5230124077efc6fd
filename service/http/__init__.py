"""ASGI plumbing every HTTP front shares: request ids, access records, upload limits, lingering close."""
