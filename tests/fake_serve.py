"""`serve()` over test_server's fake executor, for the SIGTERM / restart tests and benchmarks/faults.py.

    python tests/fake_serve.py ROOT PORT DRAIN_SECONDS     (state in ROOT/state, models in ROOT/models)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sd35fp8.server import serve
from test_server import make_fake_executor

if __name__ == "__main__":
    root, port, drain = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pending = serve("127.0.0.1", port, models_dir=root / "models", executor=make_fake_executor(root),
                    state_dir=root / "state", drain_seconds=drain, serve_frontend=False)
    print(f"exited with {len(pending)} prompt(s) left", flush=True)
