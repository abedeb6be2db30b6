"""FaceFleet's KEDA tooling: a faithful scaling simulator and threshold planner.

Operators tune `tiers.<tier>.scaling.*` in the Helm chart; `facefleet.keda.simulator` replays a traffic trace
through the same control loops the cluster runs (RabbitMQ counting, KEDA operator, HPA, pods) so a
wrong threshold shows up on a laptop instead of as a one-hour queue on a Saturday. The rules and
their sources live in shared/reference/keda.md; each module cites the section it implements.
"""

if __name__ != "facefleet.keda":  # the folder keda/ is the package facefleet.keda
    raise ImportError(f"import facefleet.keda, not {__name__} (see README 'Packaging')")
