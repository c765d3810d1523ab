"""Follow an hfl model with an MQTT client of your own (paho) and the SDK's `AppWire`:
optionally request the model, then receive each new version — verified and unsealed — and
run it with onnxruntime on scikit-learn's digits.

    python examples/app_subscriber.py --device pki/devices/app --host broker.lan \\
        --request examples/app_request.toml

The device folder is the app's, from `hfl pki issue PKI app --role app`. Without --request
it follows the versions of --model that this app requested earlier. The topics and payloads
are docs/asyncapi.yaml.
"""

from __future__ import annotations

import argparse
import queue
import sys
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sklearn.datasets import load_digits

from application import AppWire, JobStatus, ModelVersion
from hfl.runtime.mqtt import tls_context

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=Path, required=True, help="the app's device folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8883)
    ap.add_argument("--model", help="the model to follow (default: the requested one)")
    ap.add_argument("--request", type=Path, help="a TOML file of the model's fields to request")
    ap.add_argument("--versions", type=int, default=0, help="stop after N versions (0: never)")
    args = ap.parse_args(argv)
    try:
        wire = AppWire.from_device(args.device)
        spec = tomllib.loads(args.request.read_text()) if args.request else None
        request = wire.request(**spec) if spec else None
    except (OSError, ValueError) as e:  # RequestError is a ValueError naming each bad field
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = args.model or (spec or {}).get("name")
    if not model:
        print("error: say which model to follow (--model or --request)", file=sys.stderr)
        return 2

    inbox: queue.Queue = queue.Queue()  # paho's thread only queues; the work happens here
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=wire.identity.id,
                         protocol=mqtt.MQTTv5)
    files = wire.files
    # paho's own TLS settings, with a socket that paho reads at least once a second: with
    # plain `tls_set`, the end of a large version could wait in OpenSSL for the next packet.
    client.tls_set_context(tls_context(str(files.ca), str(files.cert), str(files.tls_key)))
    topics = wire.subscriptions([model])
    client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
    client.on_message = lambda c, userdata, msg: inbox.put((msg.topic, msg.payload))
    client.connect(args.host, args.port)
    client.loop_start()
    if request is not None:
        topic, payload, jobs = request
        client.publish(topic, payload, qos=1).wait_for_publish(30)
        print(f"requested {', '.join(jobs)}", flush=True)

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8), as the agents train
    seen = 0
    try:
        while not args.versions or seen < args.versions:
            for event in wire.feed(*inbox.get()):
                if isinstance(event, ModelVersion) and event.meta.model == model:
                    m, seen = event.meta, seen + 1
                    predicted = event.predict(x).argmax(axis=1)
                    accuracy = np.mean(predicted == digits.target)
                    eps = f", ε = {m.epsilon:.2f}" if m.epsilon is not None else ""
                    agents = ", ".join(f"{k} {v:.3f}" for k, v in m.metrics.eval_metrics.items())
                    print(f"{m.job} v{m.version}: accuracy {accuracy:.4f} on {len(x)} digits "
                          f"(agents: {agents or 'no evaluation'}){eps}; "
                          f"first ten: {predicted[:10].tolist()}", flush=True)
                elif isinstance(event, JobStatus) and event.finished:
                    print(f"{event.meta.job} {event.meta.state}: {event.meta.reason}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    if wire.rejections:
        print(f"refused: {wire.rejections}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
