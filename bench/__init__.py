"""The benchmark harness (``make bench``): the relay against the decode and HTTP ceilings, on the local stack."""
