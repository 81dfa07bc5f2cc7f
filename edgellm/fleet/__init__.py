"""A fleet of devices reached through TVM's RPC tracker: the engine every TVM deployment already uses.

``edgellm tracker`` runs TVM's tracker (a pool of devices keyed by device type), ``edgellm agent`` runs TVM's
RPC server on a device, registered under a key, with edgellm's runtime behind a few remote functions
(agent.py: device side, runtime dependencies only), and ``edgellm devices`` / ``profile --remote`` /
``build --tune --remote`` talk to them from a laptop (remote.py).
"""
