"""One process-wide lock around building and loading models.

``from_pretrained`` (transformers and diffusers) creates modules under context managers that patch
``torch.nn.Module`` globally (empty/meta-device initialisation), so a model built or loaded in another
thread at the same moment can end up with meta tensors. Every load in this process (pipelines, safety
checkers, the prompt classifier, the tiny builders) holds this lock.
"""

from __future__ import annotations

import threading

LOAD_LOCK = threading.RLock()
