"""The embedded, seeded demo data sets: NER (demo/build.py) and MVSA-style classification
(demo/classification.py); each module says why it is built the way it is."""

from mner.demo.build import DemoConfig, build_demo
from mner.demo.classification import make_mvsa_demo

__all__ = ["DemoConfig", "build_demo", "make_mvsa_demo"]
