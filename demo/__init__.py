"""The embedded, seeded demo data set (see demo/build.py for why it is built the way it is)."""

from mner.demo.build import DemoConfig, build_demo

__all__ = ["DemoConfig", "build_demo"]
