"""Activity recognition across two sites, from live sensor readings, on one machine.

    pip install -e examples/tasks/activity        # the task (`make install` does it)
    python examples/tasks/activity/demo.py --out activity-demo

What runs, as on a real fleet:
- a sensor bus (a plain Mosquitto, as on each board) where six stand-in accelerometers
  (examples/sensors/accelerometer.py) publish 3-axis readings, each board its own mix of
  activities (none sees all three: the data are not IID);
- the fleet: a TLS broker with client certificates and the ACL, a coordinator, two
  aggregators (sites) with three agents each. Each agent keeps its board's readings in a
  bounded window on disk (`hfl.data.live`) from the moment it starts, and trains the task
  `activity` on the newest windows each round, with SecAgg+;
- an app that requests the job and, for every new model version, classifies the windows of
  a seventh accelerometer it listens to itself, with the version's ONNX file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from application import ModelVersion
from edge_agent.runner import BoardData
from fleet.ops.broker import Broker
from fleet.sim.inproc import FleetLayout, InProcessFleet
from hfl.config import DatasetSection
from hfl.data import live_window, stop_live
from hfl.models.live import windows
from hfl.models.tasks import TaskSet
from hfl.task import Source

SENSOR = Path(__file__).resolve().parents[2] / "sensors" / "accelerometer.py"
# Which activities each board sees: two of three, so no board could learn all alone.
BOARDS = {
    "site-1": {"agent-1": "idle:4,walk:4", "agent-2": "walk:4,run:4", "agent-3": "idle:4,run:4"},
    "site-2": {"agent-4": "run:4,idle:4", "agent-5": "walk:3,idle:5", "agent-6": "run:5,walk:3"},
}
APP_PATTERN = "idle:3,walk:3,run:3"
WINDOW = 64


def sensor(port: int, topic: str, pattern: str, seed: int, rate: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SENSOR), "--port", str(port), "--topic", topic,
                             "--pattern", pattern, "--rate", str(rate), "--seed", str(seed)],
                            stdout=subprocess.DEVNULL)


def source(name: str, topic: str, bus: Broker, state: Path) -> BoardData:
    section = DatasetSection.model_validate({"topic": topic, "port": bus.port,
                                             "max_rows": 20_000, "test_fraction": 0.25})
    return BoardData(name, section, state)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("activity-demo"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rate", type=float, default=400.0, help="readings a second per sensor")
    ap.add_argument("--warmup", type=int, default=2000, help="readings each board holds "
                    "before the job is asked for")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    bus = Broker(out / "sensor-bus").start()
    sensors = [sensor(bus.port, f"sensors/{agent}/accel", pattern, i, args.rate)
               for i, (agent, pattern) in enumerate(
                   (a, p) for g in BOARDS.values() for a, p in g.items())]
    sensors.append(sensor(bus.port, "sensors/app/accel", APP_PATTERN, 99, args.rate))
    tasks = TaskSet(["activity"])
    groups = {site: {agent: {"accel": source("accel", f"sensors/{agent}/accel", bus,
                                             out / "boards" / agent)}
                     for agent in agents} for site, agents in BOARDS.items()}
    fleet = InProcessFleet(FleetLayout(groups), out / "fleet", tasks)
    app = None
    try:
        fleet.start()  # each agent's window starts listening now
        app_window = live_window(Source("app", {"topic": "sensors/app/accel",
                                                "port": bus.port}, None, out / "app"))
        boards = [b for g in groups.values() for a in g.values() for b in a.values()]
        deadline = time.monotonic() + args.timeout
        while min(len(live_window(b.source()).snapshot()[0]) for b in boards) < args.warmup:
            if time.monotonic() > deadline:
                raise SystemExit("the sensors' readings did not arrive")
            time.sleep(0.5)
        print(f"every board holds {args.warmup}+ readings; asking for the model", flush=True)
        app = fleet.app("app", models=["activity"])
        app.start()
        app.request(name="activity", task="activity", dataset="accel",
                    aggregators=sorted(BOARDS), rounds=args.rounds, min_agents=3,
                    deadline_s=120, request_id="demo")
        print("version  agents  fed. accuracy  app accuracy (ONNX, on its own sensor)")
        for version in app.models("activity", timeout=args.timeout):
            accuracy = score(version, app_window.snapshot())
            m = version.meta
            federated = m.metrics.eval_metrics.get("accuracy", float("nan"))
            print(f"{m.version:7d}  {m.agents:6d}  {federated:13.3f}  {accuracy:.3f} on windows "
                  f"of {WINDOW} readings", flush=True)
            if m.version >= args.rounds:
                onnx = out / f"activity-v{m.version}.onnx"
                onnx.write_bytes(version.onnx)
                print(f"final accuracy {accuracy:.3f}; model: {onnx}")
                return 0 if accuracy > 0.5 else 1  # three classes: chance is 1/3
        print("the job did not finish in time", file=sys.stderr)
        return 1
    finally:
        if app is not None:
            app.stop()
        fleet.stop()
        stop_live()
        for s in sensors:
            s.terminate()
            s.wait(10)
        bus.close()


def score(version: ModelVersion, snapshot) -> float:
    """The share of the app's own windows that the version's ONNX model labels right."""
    x, y, _ = snapshot
    xs, ys = windows(x, WINDOW, WINDOW), windows(y, WINDOW, WINDOW)[:, -1]
    if not len(xs):
        return float("nan")
    return float(np.mean(version.predict(xs).argmax(axis=1) == ys))


if __name__ == "__main__":
    sys.exit(main())
