"""What travels between workers, and how: the neutral room that clients, server and Ray hooks all import.

- :mod:`pipeline.transport.wire`: the Flower message format (model state and encoded updates <->
  ``ArrayRecord``, the run config as JSON) shared by the ClientApp and the ServerApp, with exact byte counts;
- :mod:`pipeline.transport.codecs` (+ :mod:`~pipeline.transport.packing`): the update codecs (cast, qsgd,
  topk, sign) and their chains;
- :mod:`pipeline.transport.error_feedback`: per-tensor residuals of what the codecs dropped;
- :mod:`pipeline.transport.update`: a whole update through the ``transport`` config's per-tensor rules;
- :mod:`pipeline.transport.downlink`: the ``delta`` downlink (the global model's compressed change) that
  server and nodes apply with the same operations;
- :mod:`pipeline.transport.node_store`: a node's own state per run and round (residuals, the global model it holds,
  an ExpandNet node's own factors);
- :mod:`pipeline.transport.compact_space`: the wire layout of federated ExpandNets sent as the compact net
  (``transport.communicate: compact``), shared by server and nodes;
- :mod:`pipeline.transport.ddp_hooks`: the DDP communication hooks that count (and compress) the gradient
  bytes each Ray worker sends.
"""
