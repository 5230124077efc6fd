"""The shared core of every protocol: settings, models and their batchers, the request path, errors."""
