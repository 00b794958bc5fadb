"""uvicorn's server, stopping the way `tformer serve` stops: on SIGTERM or Ctrl-C the
service answers 503 from then on, and the process exits 0 once the running requests are
done (uvicorn would raise the signal again at the end); a second Ctrl-C stops at once."""

import signal

import uvicorn

from tformer.serve.service import Service


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame) -> None:
        self.service.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
