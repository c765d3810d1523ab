"""The application layer: apps ask the coordinator for models and receive every version.

`App` is the SDK with its own MQTT client, `AppWire` the same app for an MQTT client of
your own (application.client); `AppMachine` and the request builder are free of I/O
(application.machine).
"""

from application.client import App, AppWire
from application.machine import (
    AppMachine,
    Event,
    JobStatus,
    ModelVersion,
    RequestError,
    RequestReply,
    request,
)

__all__ = ["App", "AppMachine", "AppWire", "Event", "JobStatus", "ModelVersion",
           "RequestError", "RequestReply", "request"]
