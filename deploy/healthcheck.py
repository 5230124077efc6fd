#!/usr/bin/env python3
"""Container health probe: exit 0 when GET http://127.0.0.1:$RESNEST_PORT<path> answers 200, else 1.

The slim and CUDA base images have no curl; the standard library is enough. Path: argv[1], default /healthz
(liveness, the Dockerfile's HEALTHCHECK); docker-compose probes /readyz so the balancer waits for warm-up.
"""

import os
import sys
import urllib.error
import urllib.request

path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
url = f"http://127.0.0.1:{os.environ.get('RESNEST_PORT', '8000')}{path}"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "2"))) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:  # HTTPError (503) is a URLError
    print(f"{url}: {exc}", file=sys.stderr)
    sys.exit(1)
