"""The GPU side: diffusers pipelines per model on one device, and everything that runs on their outputs.

- pipelines.py: ``Engine``, the pipelines of one device and the batched call (``Generation``: images and
  stage timings, timing.py); conditioning inputs (img2img, Kontext, Redux) are applied here;
- adapters.py: per-request LoRAs as resident diffusers adapters or hotswap slots;
- prompt_cache.py: the text encoders' outputs of recent prompts, so a repeated prompt skips them;
- safety.py: the image checkers (per batch) and the prompt classifier model (loaded by the API's prompt
  stage);
- optimize.py: the manifest's ``engine:`` options (attention backend, fused QKV, fp8, torch.compile, warm-up);
- weights.py: the one place that turns a weights source into a location and a dtype;
- tiny.py, tiny_safety.py: tiny random-weight models built offline (the embedded default); loading.py: the
  process-wide load lock.

Only the worker (server/worker/) imports the engine; the engine imports neither the worker, the queue nor
the API.
"""
