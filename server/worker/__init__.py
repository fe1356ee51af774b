"""The worker side: one thread per device runs batches of jobs on that device's engine.

- loop.py: ``Worker``, the device loop (batches, safety screen, encoding, answers), and ``DeviceEngine``, the
  protocol it needs from an engine (server/engine/pipelines.py ``Engine``, or a stand-in in tests);
- wiring.py: the one place that puts an ``Engine`` and a ``Worker`` on each device of a process;
- process.py: ``darkroom worker``, a process with no HTTP API that runs jobs from Redis, with probes.

It takes jobs from the queue (server/queue/) and never imports the API.
"""
