"""hfl: hierarchical federated learning for edge fleets over MQTT 5.

`hfl` is the floor every role shares: topics, the signed envelope, identities, the MQTT
session, configuration and the model zoo. It imports no role.
"""

__version__ = "0.1.0"
