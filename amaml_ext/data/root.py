"""Where the real datasets are read from: ``root`` if given, else ``$AMAML_DATA_ROOT``."""

import os

from .. import _checks

#: the environment variable holding the default data root
ENV_ROOT = "AMAML_DATA_ROOT"


def given_root(root, holding: str) -> str:
    """``root`` if given, else ``$AMAML_DATA_ROOT`` (not checked to exist); ``holding`` names the
    folders the root should hold, for the message when neither is there."""
    if root is None:
        root = os.environ.get(ENV_ROOT) or None
        if root is None:
            raise ValueError(f"argument 'root' was not given and the environment variable {ENV_ROOT} is not set: "
                             f"pass root=<the folder holding {holding}> or set {ENV_ROOT}")
        return root
    return _checks.path("root", root)


def data_root(root=None, holding: str = "omniglot/ and/or miniimagenet/") -> str:
    """``root`` if given, else ``$AMAML_DATA_ROOT``; an existing folder, else a clear error."""
    given = root is not None
    root = given_root(root, holding)
    origin = f"root={root!r}" if given else f"{ENV_ROOT}={root!r}"
    if not os.path.exists(root):
        raise FileNotFoundError(f"data root {origin} does not exist (expected a folder holding {holding})")
    if not os.path.isdir(root):
        raise ValueError(f"data root {origin} is not a folder")
    return root
