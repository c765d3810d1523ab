"""A stand-in for a 3-axis accelerometer: publishes readings on an MQTT topic, the
activity's label as `y`, in the JSON format `hfl.models.live.LiveWindow` reads.

    python examples/sensors/accelerometer.py --topic sensors/accel --rate 50 \\
        --pattern idle:5,walk:10,run:5

Each reading is ``{"t": unix time, "x": [ax, ay, az] in g, "y": label}``. The pattern
cycles through activities, each for its seconds of signal time (at --rate readings a
second), until --count readings or --seconds have passed (default: forever).

Activities and labels: motion idle 0, walk 1, run 2 (gravity on z plus a gait at 1.8 or
2.8 Hz); machine vibration normal 0, anomalous 1 (a 25 Hz hum; anomalous adds a harmonic
and random knocks). --rate 0 publishes as fast as the broker takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

LABELS = {"idle": 0, "walk": 1, "run": 2, "normal": 0, "anomalous": 1}
GAIT_HZ = {"walk": 1.8, "run": 2.8}
GAIT_G = {"walk": 0.3, "run": 1.0}
HUM_HZ = 25.0
SIGNAL_HZ = 50.0  # the signal's sample rate when --rate 0


def reading(activity: str, s: float, rng: np.random.Generator) -> list[float]:
    """One [ax, ay, az] in g at signal time `s` seconds."""
    noise = rng.normal(0.0, 0.02, 3)
    if activity == "idle":
        a = np.array([0.0, 0.0, 1.0])
    elif activity in GAIT_HZ:
        phase = 2 * np.pi * GAIT_HZ[activity] * s
        g = GAIT_G[activity]
        a = np.array([0.5 * g * np.sin(phase), 0.3 * g * np.cos(phase),
                      1.0 + g * np.sin(2 * phase)])
    else:
        hum = 0.05 * np.sin(2 * np.pi * HUM_HZ * s)
        a = np.array([hum, 0.5 * hum, 1.0 + 0.2 * hum])
        if activity == "anomalous":
            a += 0.08 * np.sin(2 * np.pi * 3 * HUM_HZ * s)
            if rng.random() < 0.05:  # a knock
                a += rng.normal(0.0, 0.5, 3)
    return [round(float(v), 5) for v in a + noise]


def parse_pattern(text: str) -> list[tuple[str, float]]:
    """"idle:5,walk:10" -> [("idle", 5.0), ("walk", 10.0)]."""
    out = []
    for part in text.split(","):
        name, _, seconds = part.partition(":")
        if name not in LABELS or not seconds or float(seconds) <= 0:
            raise ValueError(f"bad pattern part {part!r}: NAME:SECONDS, NAME one of "
                             f"{', '.join(LABELS)}")
        out.append((name, float(seconds)))
    return out


def activity_at(pattern: list[tuple[str, float]], s: float) -> str:
    s %= sum(d for _, d in pattern)
    for name, d in pattern:
        if s < d:
            return name
        s -= d
    return pattern[-1][0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--topic", default="sensors/accel")
    ap.add_argument("--rate", type=float, default=50.0, help="readings a second (0: flat out)")
    ap.add_argument("--pattern", default="idle:5,walk:10,run:5")
    ap.add_argument("--count", type=int, help="stop after this many readings")
    ap.add_argument("--seconds", type=float, help="stop after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--username")
    ap.add_argument("--password")
    args = ap.parse_args(argv)
    try:
        pattern = parse_pattern(args.pattern)
    except ValueError as e:
        ap.error(str(e))
    rng = np.random.default_rng(args.seed)
    hz = args.rate or SIGNAL_HZ
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.connect(args.host, args.port)
    client.loop_start()
    start = time.monotonic()
    i = 0
    info = None
    try:
        while args.count is None or i < args.count:
            if args.seconds is not None and time.monotonic() - start >= args.seconds:
                break
            s = i / hz
            activity = activity_at(pattern, s)
            payload = {"t": time.time(), "x": reading(activity, s, rng), "y": LABELS[activity]}
            info = client.publish(args.topic, json.dumps(payload), qos=1)
            i += 1
            if args.rate:
                time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
            elif i % 100 == 0:
                info.wait_for_publish()  # flat out, but never more than 100 in flight
        if info is not None:
            info.wait_for_publish()  # the last one is on the broker before we disconnect
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    print(f"published {i} readings on {args.topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
