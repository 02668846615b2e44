"""retdmctl: a resumable pipeline for RETDM multi-label image classification.

The Python API (:mod:`retdmctl.api`, loaded on first use so that the command line starts
fast)::

    import retdmctl

    ws = retdmctl.Workspace("retdm-work")
    ws.ingest("demo", images=200)
    ws.run()
    print(ws.status(), ws.metrics())
    probs = retdmctl.load_predictor(ws).predict(["photo.jpg"])
"""

__version__ = "0.1.0"

__all__ = ["Workspace", "load_predictor", "RetdmError", "__version__"]

_LAZY = {"Workspace": "retdmctl.api", "load_predictor": "retdmctl.api", "RetdmError": "retdmctl.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # by name: the layers contract sees no import of the API from here

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'retdmctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
