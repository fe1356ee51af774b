"""The API half of the safety checker: its policy and the prompt stage (the image stage runs in the worker,
server/engine/safety.py).

- ``resolve_check``: whether a request is checked. ``disable_safety_checker: true`` is honored only when
  the model allows it (``capabilities.safety_checker_optional``) and the operator does
  (``safety.allow_disable``: never / always / per_key); otherwise 403.
- ``PromptGuard``: a word list, regular expressions and optionally a transformers text classifier, run in
  the API before a job is queued, so a flagged prompt costs no GPU work. Flagged: 422. The lists match a
  normalised copy of the prompt (``normalize``: compatibility forms, case, invisible characters and
  combining marks folded away; ``_`` and punctuation separate words), so "ｃｓａｍ", "c\u200bsam" or
  "child_porn" match as "csam" and "child porn" do. Look-alike letters of other scripts (Cyrillic "а" for
  Latin "a") are not folded.

What was checked and flagged is counted in ``SafetyCounters`` (server/metrics.py; reported on ``/ready``).
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import SafetySettings
from ..errors import Forbidden, SafetyFlagged, ServiceUnavailable
from ..metrics import SafetyCounters
from ..registry import ModelManifest

if TYPE_CHECKING:
    from ..engine.safety import TextClassifier

log = logging.getLogger(__name__)


def resolve_check(
    safety: SafetySettings, manifest: ModelManifest, disable: bool | None, api_key: str | None,
    counters: SafetyCounters | None = None, key_allows: bool | None = None,
) -> bool:
    """True when the request's prompt and images must be checked; 403 for a refused disable.

    ``key_allows``: the permission of a key from the key store (server/api/keys.py), which decides under
    ``per_key`` instead of ``disable_keys``; None for other keys.
    """
    if not safety.enabled:
        return False  # nothing runs anyway; disabling is a no-op
    if not disable:
        return True
    refusal: str | None = None
    if not manifest.capabilities.safety_checker_optional:
        refusal = f"model {manifest.id} does not allow disabling the safety checker"
    elif safety.allow_disable == "never":
        refusal = "this server does not allow disabling the safety checker (safety.allow_disable: never)"
    elif safety.allow_disable == "per_key":
        supplied = (api_key or "").encode()
        allowed = False
        for key in safety.disable_keys:  # every key is compared, in constant time
            allowed |= hmac.compare_digest(supplied, key.get_secret_value().encode())
        if key_allows is not None:
            allowed = key_allows
        if not allowed:
            refusal = "this API key may not disable the safety checker"
    if refusal is not None:
        if counters is not None:
            counters.add("disable_refused")
        raise Forbidden(refusal, param="disable_safety_checker", code="safety_checker_required")
    if counters is not None:
        counters.add("disable_honored")
    return False


# Dropped from the matching copy: format characters (Cf: zero-width space and joiners, soft hyphen, word
# joiner, BOM, bidi controls) and combining marks (Mn: accents, the combining grapheme joiner, variation
# selectors), which change how a word is written but not how it reads.
_DROPPED = ("Cf", "Mn")


def normalize(text: str) -> str:
    """The copy of a prompt (or a word-list entry, or a pattern) that the word and pattern lists match.

    Unicode compatibility decomposition (NFKD: full-width and other compatibility forms become the plain
    letters), minus format characters and combining marks, recomposed (NFKC) and case-folded
    (``str.casefold``: "ß" matches "ss"); ``_`` becomes a space, so it separates words as other
    punctuation does (in a regular expression ``_`` is a word character, so ``\\b`` would not match beside
    it). Cross-script look-alikes (Cyrillic "а" for Latin "a") are left as they are.
    """
    return _fold(text).casefold().replace("_", " ")


def _fold(text: str) -> str:
    """NFKD, without format characters and combining marks, then NFKC."""
    kept = (c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) not in _DROPPED)
    return unicodedata.normalize("NFKC", "".join(kept))


def _phrase(word: str) -> str | None:
    """A word-list entry as a regex over ``normalize``d text: whole words, any run of spaces or punctuation
    between them ("child porn" matches "child_porn", "child-porn", "child.  porn"); None for an entry with no
    letters or digits."""
    parts = [part for part in re.split(r"\W+", normalize(word)) if part]
    if not parts:
        return None
    return r"(?<!\w)" + r"\W+".join(re.escape(part) for part in parts) + r"(?!\w)"


def _pattern_form(pattern: str) -> str:
    """A configured regular expression as it is matched against the normalised prompt: the same folding but
    the case (``str.casefold`` would turn ``\\W`` into ``\\w``; the patterns match case-insensitively)."""
    return _fold(pattern)


class PromptGuard:
    """The prompt stage. The word list is instant; the optional classifier loads in the background."""

    def __init__(self, safety: SafetySettings, cache_dir: Path) -> None:
        self.safety = safety
        self.cache_dir = cache_dir
        self.counters = SafetyCounters()
        words = [phrase for w in safety.prompt.blocklist if (phrase := _phrase(w)) is not None]
        self._words = re.compile("|".join(words), re.IGNORECASE) if words else None
        # Each pattern as configured (searched in the prompt as sent) and normalised (in the normalised copy).
        self._patterns = [re.compile(form, re.IGNORECASE | re.DOTALL) for p in safety.prompt.patterns
                          for form in dict.fromkeys((p, _pattern_form(p)))]
        self._classifier: TextClassifier | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._classifier_lock = threading.Lock()  # torch modules are not re-entrant across threads
        if not self.needs_classifier:
            self.loaded.set()

    @property
    def needs_classifier(self) -> bool:
        return self.safety.enabled and self.safety.prompt.classifier is not None

    @property
    def failed(self) -> bool:
        return self.load_error is not None

    def start_loading(self) -> None:
        if not self.loaded.is_set() and not self.failed:
            threading.Thread(target=self._load, name="prompt-classifier", daemon=True).start()

    def _load(self) -> None:
        # torch and transformers: only in an API process configured with a prompt classifier.
        from ..engine.safety import TextClassifier

        spec = self.safety.prompt.classifier
        assert spec is not None
        try:
            self._classifier = TextClassifier(spec, self.cache_dir)
            self._classifier.score("warm-up")
        except Exception as exc:  # noqa: BLE001 - reported on /ready and to requests
            log.exception("prompt classifier failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.loaded.set()

    def state(self) -> str:
        if self.failed:
            return f"failed: {self.load_error}"
        if not self.needs_classifier:
            return "word list only" if self.safety.enabled else "disabled"
        return "ready" if self.loaded.is_set() else "loading"

    def check(self, prompt: str, wait_s: float = 0.0) -> None:
        """Raise 422 when the prompt is flagged (blocking: call it off the event loop with a classifier)."""
        self.counters.add("prompts_checked")
        stage = None
        folded = normalize(prompt)
        texts = (prompt,) if folded == prompt else (prompt, folded)  # patterns see both forms
        if self._words is not None and self._words.search(folded):
            stage = "word list"
        elif any(p.search(text) for p in self._patterns for text in texts):
            stage = "pattern list"
        elif self.needs_classifier:
            if not self.loaded.wait(wait_s) or self._classifier is None:
                raise ServiceUnavailable(
                    f"the prompt classifier is not available ({self.state()}); retry later",
                    headers={"retry-after": "5"},
                )
            with self._classifier_lock:
                flagged, score = self._classifier.flags(prompt)
            if flagged:
                stage = f"classifier, score {score:.3f}"
        if stage is None:
            return
        self.counters.add("prompts_flagged")
        log.info("prompt flagged stage=%s chars=%d", stage, len(prompt))
        raise SafetyFlagged(
            f"the safety checker flagged the prompt ({stage}); no image was generated",
            param="prompt", code="prompt_flagged",
        )
