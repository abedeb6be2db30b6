"""The GPU consumer: `facefleet worker` and the processors it runs."""
