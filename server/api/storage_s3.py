"""Images in S3-compatible object storage, handed out as presigned, expiring GET URLs.

The API process that answers a request uploads its images (workers need no storage credentials) and
returns ``GetObject`` URLs presigned (SigV4) for ``storage.url_ttl_s`` seconds: anyone holding one may
fetch the image until it expires, as with Together's hosted URLs, and the bucket itself stays private.

Keeping images bounded: a bucket lifecycle rule expires objects under ``storage.s3.prefix`` (S3 counts in
whole days; ``storage.s3.lifecycle_rule: true`` installs the rule at start-up from ``retention_s``), or,
for stores without lifecycle support, ``storage.s3.sweep: true`` deletes old objects from the API's
periodic sweep. Credentials come from boto3's standard chain, never from the config file.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

from ..config import StorageSettings
from ..errors import NotFound
from .storage import MEDIA_TYPES, LocalStorage

log = logging.getLogger(__name__)

LIFECYCLE_RULE_ID = "darkroom-image-expiry"
# SigV4 presigned URLs live at most seven days.
MAX_URL_TTL_S = 7 * 24 * 3600


class S3Storage:
    def __init__(self, settings: StorageSettings, client: Any = None) -> None:
        import boto3
        from botocore.config import Config

        s3 = settings.s3
        self.bucket = s3.bucket
        self.prefix = s3.prefix
        self.url_ttl_s = min(settings.url_ttl_s, MAX_URL_TTL_S)
        self.retention_s = settings.retention_s
        self.sweep = s3.sweep
        if settings.url_ttl_s > settings.retention_s:
            log.warning("storage.url_ttl_s is longer than storage.retention_s: URLs outlive their images")
        config = Config(signature_version="s3v4", s3={"addressing_style": s3.addressing_style},
                        retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        session = boto3.session.Session()
        self.client = client or session.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                                                config=config)
        # Presigning is local (no request); a second client only when clients use another host name.
        self.signer = (session.client("s3", endpoint_url=s3.public_endpoint_url, region_name=s3.region,
                                      config=config)
                       if s3.public_endpoint_url else self.client)
        if s3.lifecycle_rule:
            self.install_lifecycle_rule()

    def put(self, data: bytes, fmt: str) -> str:
        key = f"{self.prefix}{uuid.uuid4().hex}.{fmt}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=MEDIA_TYPES[fmt],
                               CacheControl=f"private, max-age={self.url_ttl_s}")
        return key

    def url(self, key: str, base: str, now: float | None = None) -> str:
        """A presigned GET URL (``base``, the API's own address, is not involved)."""
        return self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_ttl_s)

    def open(self, key: str, expires: int, signature: str, now: float | None = None) -> Any:
        raise NotFound("images are served from object storage, not by this server", code="file_not_found")

    def cleanup(self, now: float | None = None) -> int:
        """With ``sweep``: delete objects under the prefix older than the retention. Else the bucket's
        lifecycle rule does it, and this is a no-op."""
        if not self.sweep:
            return 0
        cutoff = (now if now is not None else time.time()) - self.retention_s
        paginator = self.client.get_paginator("list_objects_v2")
        old: list[dict[str, str]] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            old += [{"Key": o["Key"]} for o in page.get("Contents", [])
                    if o["LastModified"].timestamp() < cutoff]
        for start in range(0, len(old), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": old[start:start + 1000], "Quiet": True})
        if old:
            log.info("storage sweep removed=%d bucket=%s", len(old), self.bucket)
        return len(old)

    def lifecycle_days(self) -> int:
        return max(1, math.ceil(self.retention_s / 86400))

    def install_lifecycle_rule(self) -> None:
        """Add (or replace) our expiry rule, keeping every other rule of the bucket."""
        from botocore.exceptions import ClientError

        try:
            rules = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket).get("Rules", [])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        rules = [r for r in rules if r.get("ID") != LIFECYCLE_RULE_ID]
        rules.append({"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": self.prefix},
                      "Expiration": {"Days": self.lifecycle_days()},
                      "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}})
        self.client.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                       LifecycleConfiguration={"Rules": rules})
        log.info("lifecycle rule %s: objects under %r expire after %d day(s)", LIFECYCLE_RULE_ID,
                 self.prefix, self.lifecycle_days())


def open_storage(settings: StorageSettings) -> LocalStorage | S3Storage:
    """The storage backend the settings name."""
    if settings.backend == "s3":
        return S3Storage(settings)
    return LocalStorage(settings)
