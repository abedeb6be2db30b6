"""The GPU consumer: `facefleet worker` and the processors it runs."""

if __name__ != "facefleet.consumer":  # the folder consumer/ is the package facefleet.consumer
    raise ImportError(f"import facefleet.consumer, not {__name__} (see README 'Packaging')")
