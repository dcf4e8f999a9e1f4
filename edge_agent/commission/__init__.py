"""Commissioning: find out what a device offers before configuring it, without writing to it.

- :mod:`~edge_agent.commission.browse` walks an OPC UA server and describes every Variable;
- :mod:`~edge_agent.commission.emit` turns that into a ``[[devices]]`` block for the config;
- :mod:`~edge_agent.commission.probe` reads Modbus registers once and decodes them with
  :mod:`~edge_agent.commission.decode` (pure: every type in every byte and word order);
- :mod:`~edge_agent.commission.check` reads every configured device once (``check-config --probe``).

Everything here only reads: Browse, BrowseNext and Read on OPC UA, the four read functions on
Modbus, the drivers' ``connect``, ``read`` and ``close``. Writes go through the safety gate only.
"""
