"""What travels between workers, and how: the neutral room that clients, server and Ray hooks all import.

- :mod:`pipeline.transport.wire`: the Flower message format (model state <-> ``ArrayRecord``, the run
  config as JSON) shared by the ClientApp and the ServerApp, with exact byte counts;
- :mod:`pipeline.transport.ddp_hooks`: the DDP communication hooks that count (and compress) the gradient
  bytes each Ray worker hands to allreduce.
"""
