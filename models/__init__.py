"""The shipped ONNX models and their cards; installed as ``edge_agent.demo.models`` (package data).

The files are found through the package (``importlib.resources``), never through a checkout.
"""
