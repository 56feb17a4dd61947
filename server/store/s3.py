"""Images in an S3-compatible bucket (`--image-store s3://bucket/prefix`, `--s3-endpoint` for MinIO, R2, Ceph
and the like), through boto3; credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID and friends,
~/.aws, an instance role).

Each image is the object `<prefix><imageUUID>.<ext>` with its content type and its expiry time in the
metadata (`x-amz-meta-expires-at`), which a lookup checks, so an expired image answers 404 at once on every
front-end. S3 listings carry no metadata, so the sweep reads an index kept in the bucket itself: each image
has an empty marker `<prefix>.expiry/<expiry, 11 digits>-<name>`, and listings come in key order, i.e. by
expiry, so a sweep reads only the markers that are due and stops at the first that is not. Several
front-ends may sweep at once: deleting an object twice is harmless. (A bucket lifecycle rule counts whole
days and cannot honour a TTL of seconds.)

imageURL is either this server's /image/<name>, streamed from the bucket by whichever front-end receives it
(`--image-urls proxy`, the default), or a presigned GET on the bucket (`presigned`), valid for the image's
TTL (at most 7 days, SigV4's limit); the object is deleted by the sweep after its TTL.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .images import (
    EXTENSIONS,
    MEDIA_TYPES,
    ImageStore,
    ImageStoreError,
    LiveImage,
    StoredImage,
    parse_name,
    parse_s3_location,
)

log = logging.getLogger("k5serve.images")

PRESIGN_MAX = 7 * 86400  # SigV4 presigned URLs live at most a week
_MARKERS = ".expiry/"
_CHUNK = 64 * 1024
_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3ImageStore(ImageStore):
    kind = "s3"

    def __init__(self, location: str, *, endpoint: str | None = None, presigned: bool = False,
                 probe_every: float = 1.0):
        self.location = location
        self.bucket, self.prefix = parse_s3_location(location)
        self.endpoint = endpoint
        self.presigned = presigned
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
        self._s3 = session.client("s3", endpoint_url=endpoint, region_name=region, config=Config(
            signature_version="s3v4", max_pool_connections=32, connect_timeout=5, read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"}))
        # /ready's probe: one quick try, so that a hanging endpoint holds no thread for long
        self._probe_client = session.client("s3", endpoint_url=endpoint, region_name=region, config=Config(
            signature_version="s3v4", connect_timeout=2, read_timeout=3, retries={"max_attempts": 1}))
        self._probe_lock = threading.Lock()
        self._probe_every = probe_every
        self._probed: tuple[float, str | None] = (0.0, None)
        problem = self.probe()
        if problem:
            log.warning("%s", problem)

    # -- ImageStore

    def put(self, data: bytes, ext: str, ttl: float) -> StoredImage:
        image = StoredImage(str(uuid.uuid4()), ext, time.time() + ttl)
        marker = self._marker(image.name, image.expires_at)
        # The marker first: a crash between the two leaves a marker without an image (swept harmlessly), never
        # an image that no sweep would find. PUT is atomic in S3: a reader never sees half an object.
        self._call("storing an image", self._s3.put_object, Bucket=self.bucket, Key=marker, Body=b"")
        try:
            self._call("storing an image", self._s3.put_object, Bucket=self.bucket, Key=self.prefix + image.name,
                       Body=data, ContentType=MEDIA_TYPES[ext],
                       Metadata={"expires-at": f"{image.expires_at:.3f}"})
        except BaseException:
            self._delete_keys([marker])
            raise
        return image

    def delete(self, image: StoredImage) -> None:
        if not self._delete_keys([self.prefix + image.name]):
            self._delete_keys([self._marker(image.name, image.expires_at)])

    def lookup(self, name: str) -> LiveImage | None:
        parsed = parse_name(name)
        if parsed is None:
            return None
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise self._error("reading an image", exc) from None
        except BotoCoreError as exc:
            raise self._error("reading an image", exc) from None
        expires_at = _expiry(obj.get("Metadata", {}))
        body = obj["Body"]
        if expires_at is None or expires_at <= time.time():
            body.close()
            if expires_at is not None:
                try:  # expired either way; if this fails, the sweep removes it
                    self.delete(StoredImage(parsed[0], parsed[1], expires_at))
                except ImageStoreError as exc:
                    log.warning("%s", exc.detail)
            return None
        created = obj.get("LastModified")
        return LiveImage(parsed[1], expires_at, chunks=body.iter_chunks(_CHUNK), size=obj.get("ContentLength"),
                         close=body.close, created_at=created.timestamp() if created is not None else None)

    def read(self, image_uuid: str) -> bytes | None:
        listing = self._call("reading an image", self._s3.list_objects_v2, Bucket=self.bucket,
                             Prefix=f"{self.prefix}{image_uuid}.", MaxKeys=len(EXTENSIONS) + 1)
        for item in listing.get("Contents", []):
            found = self.lookup(item["Key"][len(self.prefix):])
            if found is not None:
                try:
                    return b"".join(found.chunks)
                except BotoCoreError as exc:
                    raise self._error("reading an image", exc) from None
                finally:
                    found.close()
        return None

    def sweep(self) -> int:
        """Images first, then the markers of those that went: a marker is the only way to find its image."""
        now, markers, images = time.time(), [], {}
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + _MARKERS)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    stamp, _, name = item["Key"][len(self.prefix + _MARKERS):].partition("-")
                    if stamp.isdigit() and int(stamp) > now:
                        break  # markers come in expiry order: the rest are not due
                    markers.append(item["Key"])
                    if parse_name(name) is not None:
                        images[item["Key"]] = self.prefix + name
                else:
                    continue
                break
        except (BotoCoreError, ClientError) as exc:
            raise self._error("sweeping expired images", exc) from None
        failed = self._delete_keys(list(images.values()))
        self._delete_keys([m for m in markers if images.get(m) not in failed])
        return len(images) - len(failed)

    def status(self) -> dict:
        problem = self.probe()
        return {"kind": self.kind, "location": self.location, "imageURLs": "presigned" if self.presigned else "proxy",
                "reachable": problem is None} | ({"problem": problem} if problem else {})

    def url(self, image: StoredImage, base_url: str) -> str:
        if not self.presigned:
            return super().url(image, base_url)
        ttl = max(1, min(PRESIGN_MAX, int(image.expires_at - time.time())))
        return self._s3.generate_presigned_url("get_object", ExpiresIn=ttl,
                                               Params={"Bucket": self.bucket, "Key": self.prefix + image.name})

    # -- helpers

    def probe(self) -> str | None:
        """Whether the bucket answers (HEAD bucket), at most once per `probe_every` seconds; while a probe is
        under way, callers get the last answer rather than waiting for it."""
        at, problem = self._probed
        if time.monotonic() - at < self._probe_every or not self._probe_lock.acquire(blocking=False):
            return problem
        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
            problem = None
        except (BotoCoreError, ClientError) as exc:
            problem = self._error("reaching the bucket", exc).detail
        finally:
            self._probe_lock.release()
        self._probed = (time.monotonic(), problem)
        return problem

    def _marker(self, name: str, expires_at: float) -> str:
        """Its whole second, rounded up: a marker whose second has come is always due."""
        return f"{self.prefix}{_MARKERS}{math.ceil(expires_at):011d}-{name}"

    def _delete_keys(self, keys: list[str]) -> set[str]:
        """Delete these keys; -> those the store refused (DeleteObjects answers 200 and lists them)."""
        failed: set[str] = set()
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            answer = self._call("deleting images", self._s3.delete_objects, Bucket=self.bucket,
                                Delete={"Objects": batch, "Quiet": True})
            for error in answer.get("Errors", []):
                failed.add(error.get("Key"))
                log.warning("%s: deleting %s failed (%s)", self.location, error.get("Key"), error.get("Code"))
        return failed

    def _call(self, doing: str, method, **kwargs):
        try:
            return method(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(doing, exc) from None

    def _error(self, doing: str, exc: Exception) -> ImageStoreError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code, words = error.get("Code", "?"), error.get("Message") or exc
        else:
            code, words = type(exc).__name__, exc
        reason = f"{code}: {words}"
        where = self.location + (f" at {self.endpoint}" if self.endpoint else "")
        # Clients get the kind of failure; the log and /ready get S3's own words (which may name accounts).
        return ImageStoreError(f"the image store is unavailable ({doing} failed: {code})",
                               detail=f"the image store {where}: {doing} failed ({reason})")


def _expiry(metadata: dict) -> float | None:
    try:
        return float(metadata["expires-at"])
    except (KeyError, ValueError):
        return None  # not an object this server wrote
