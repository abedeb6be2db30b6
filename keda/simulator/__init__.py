"""Second-by-second simulation of one tier: traffic -> RabbitMQ -> KEDA -> HPA -> pods.

Layout (one control loop per module, each citing keda.md):

    config.py        tier settings from Helm values (the chart's keys)
    dist.py          SPEC strings for service and start-up times
    traffic.py       traces and named arrival patterns
    queue.py         the broker: ready/unacked, AMQP vs management counting (§1.2)
    keda_operator.py activation, cooldown, idle/min replicas (§2.1)
    hpa.py           replica calculator, legacy and behavior paths (§4.2-§4.6)
    pods.py          start-up, SIGTERM drain, victim ranking (§4.7, §6.1)
    scaledjob.py     Jobs created per poll for each strategy (§5.1)
    engine.py        the per-second loop tying them together
    stats.py         waits, drain time, GPU-seconds
    report.py        timeline.csv, summary.json, timeline.png
    plan.py          threshold search against a p95 target
"""
