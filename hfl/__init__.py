"""hfl: hierarchical federated learning for edge fleets over MQTT 5.

`hfl` is the floor every role shares: topics, the signed envelope, identities, the MQTT
session, configuration and the model zoo. It imports no role.
"""

__version__ = "0.1.0"
# The day this version was made: a board whose clock reads earlier has no RTC and no time
# sync yet (`hfl agent check`). Move it with every release.
__released__ = "2026-11-24"
