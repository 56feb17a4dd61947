"""k5serve: a self-hosted, Runware-compatible inference server for Kandinsky 5.0 Image Lite.

The code lives in four sub-packages, kept as top-level folders of the repository and installed under this
name (setuptools `package-dir`): `k5serve.server` (the Runware protocol, torch-free) → `k5serve.pipelines`
(generation) → `k5serve.accel` (step caching) and `k5serve.weights` (real and tiny checkpoints). This folder
holds only what all of them share: the version and the task-id context of log lines.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("k5serve")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
