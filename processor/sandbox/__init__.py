"""Local twins of the vendor APIs, for the demo, the tests and the benchmark."""

from processor.sandbox.core import Faults, Sandbox, Twin
from processor.sandbox.server import TWINS, SandboxServer, build_app

__all__ = ["TWINS", "Faults", "Sandbox", "SandboxServer", "Twin", "build_app"]
