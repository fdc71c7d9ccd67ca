"""The site worker: a long-lived process that owns the site's data, model, ledger and policy.

`python -m medfed.client.worker SITE_TOML` (what `medfed site start` runs) loads everything
once, serves the site API on `<state_dir>/worker.sock` and stops cleanly on SIGTERM
or SIGINT. The socket appearing is the sign that it is ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from medfed.client.config import load_site_config
from medfed.client.errors import ClientError
from medfed.client.worker_rpc import serve, worker_socket_path

log = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
TORCH_THREADS_VARIABLE = "MEDFED_TORCH_THREADS"
"""If set, the worker's torch uses this many CPU threads (the demo runs several sites on
one machine; a hospital's worker takes all cores by default)."""


def run_worker(site_toml: Path, *, stop: threading.Event | None = None) -> None:
    """Serve the site API for `site_toml` until `stop` is set (or a signal arrives)."""
    import medfed.client.trainer  # noqa: F401  # torch and opacus, imported once before serving
    from medfed.client.site_api import SiteService

    config = load_site_config(site_toml)
    # Each study's data is read and encoded on its first message, then kept warm.
    service = SiteService(config)
    socket_path = worker_socket_path(config)
    server = serve(service, socket_path)
    log.info("site worker of %s serving on %s", config.site.id, socket_path)
    stopping = stop or threading.Event()
    if stop is None:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        stopping.wait()
    finally:
        server.stop(STOP_GRACE_S).wait()
        socket_path.unlink(missing_ok=True)
        log.info("site worker of %s stopped", config.site.id)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line on stderr and exit 1 for a misconfigured site."""
    parser = argparse.ArgumentParser(prog="python -m medfed.client.worker")
    parser.add_argument("site_toml", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    threads = os.environ.get(TORCH_THREADS_VARIABLE)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    from medfed.privacy.errors import PrivacyError
    from medfed.sites.errors import SiteError

    try:
        run_worker(args.site_toml)
    except (ClientError, PrivacyError, SiteError) as exc:
        sys.stderr.write(f"medfed site worker: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
