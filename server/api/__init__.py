"""The HTTP side: Together's image API on FastAPI, and everything only an API process does.

- app.py (``create_app``), runtime.py (what an API process runs), images.py (``POST /v1/images/generations``),
  service.py (models, health, readiness, stored files), operator.py (metrics, playground), errors.py (the
  error envelope), observe.py (request ids, per-request metrics and logs), http.py (the HTTP layer's
  limits under uvicorn), hosts.py (where image URLs point; allowed Host names);
- schemas.py (the request body into ``GenerationParams``), conditioning.py (image inputs, fetched here),
  loras.py (``image_loras`` checked), safety.py (who may skip the checker; the prompt stage);
- lanes.py (bounded executors for downloads, decodes and the prompt classifier);
- auth.py, keys.py, ratelimit.py (API keys, their models and limits);
- storage.py, storage_s3.py (images behind signed or presigned URLs).

It submits jobs through the queue (server/queue/) and never imports the worker or the engine: an API pod
(``darkroom api``) never imports torch. Its only way to the engine is the optional prompt classifier.
"""
