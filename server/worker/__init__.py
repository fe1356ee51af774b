"""The worker side: one worker per device runs batches of jobs on that device's engine.

- loop.py: ``Worker``, the device loop (batches, failures answered by kind, the run deadline), and
  ``DeviceEngine``, the protocol it needs from an engine (server/engine/pipelines.py ``Engine``, or a stand-in
  in tests); faults.py sorts what a pipeline call raised (out of memory, sticky device error, other);
- post.py: beside the device, the safety screen, encoding and answers, behind a bounded hand-off;
  prefetch.py: beside the device, downloads of the LoRA files a batch lacks;
- wiring.py: the one place that puts an ``Engine`` and a ``Worker`` on each device of a process;
- children.py (parent) and child.py (child): `darkroom serve` on several devices, one worker process each,
  fed by the server's queue over a pipe;
- process.py: ``darkroom worker``, a process with no HTTP API that runs jobs from Redis, with probes.

It takes jobs from the queue (server/queue/) and never imports the API.
"""
