"""The queue between the API and the workers: in-process for one node, Redis Streams for many.

- protocol.py: the contracts, ``JobQueue`` (what the API needs) and ``BatchSource`` (what a worker needs);
- batching.py: the one rule that fills a batch with compatible jobs, for every backend;
- submit.py: the API's use of any queue: submit and await a job, withdraw it, fail the waiting ones;
- memory.py: ``MemoryQueue``, both contracts in one process (``darkroom serve``);
- redis_keys.py (key layout, Lua scripts, client), redis_api.py (``RedisQueue``, API side),
  redis_worker.py (``RedisSource``, worker side), wire.py (the JSON codec of jobs and replies).

The queue imports neither the API nor the worker nor the engine, and never torch.
"""
