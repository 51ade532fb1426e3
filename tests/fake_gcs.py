"""A fake Google Cloud Storage server for tests: the subset of the GCS JSON API that gcsfs (etils.epath on gs://),
google-cloud-cpp (array_record's native gs:// reader, via riegeli) and tensorstore's `gcs` kvstore (Orbax) use,
backed by an in-memory dict, on a free localhost port. No network, no credentials.

Public surface: `FakeGcs` (the server: `start()`, `stop()`, `endpoint`, `create_bucket`, `put`, `get`, `delete`,
`names`, `requests`, `unhandled`), `gcs_env(endpoint) -> dict` (the environment variables pointing the three clients
at it) and the pytest fixture `fake_gcs` (import it into a test module; gives a `FakeGcsHandle`): one server per
process and, per test, a fresh empty bucket and the env (monkeypatch.setenv); gcsfs (plain HTTP, anonymous) is
registered as fsspec's "gs"/"gcs" file system for the test, and etils.epath's cached gs:// file system is dropped
before and after (other tests register an in-memory one). FAKE_GCS_VERBOSE=1 logs every request to stderr.

When the clients read the env (measured): google-cloud-cpp (array_record) reads CLOUD_STORAGE_EMULATOR_ENDPOINT for
each reader it opens, tensorstore reads TENSORSTORE_GCS_HTTP_URL for each kvstore it opens but sets up its auth
provider once per process, gcsfs reads STORAGE_EMULATOR_HOST for each call but GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT and
FSSPEC_* once, when imported (the fixture sets gcsfs up itself). With one endpoint per process, setting the env
for each test is enough in-process; a subprocess gets it through its environment (handle.env).

Requests the server does not implement are answered 400 (which no client retries) with a GCS JSON error, printed
to stderr and kept in `unhandled` (the fixture fails the test on any), so a gap in the emulation shows up.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

try:
    import google_crc32c
except ImportError:                                     # gcsfs depends on it; without it no crc32c is sent
    google_crc32c = None

# Unreachable: anything that still asks a GCE metadata server fails at once instead of waiting for a timeout.
_NO_METADATA = "127.0.0.1:9"


def gcs_env(endpoint: str) -> dict[str, str]:
    """Environment variables sending the three GCS clients to `endpoint` ("http://127.0.0.1:PORT") without
    credentials."""
    host = endpoint.split("://", 1)[-1]
    return {
        "STORAGE_EMULATOR_HOST": endpoint,                  # gcsfs (and google-cloud-storage)
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,        # google-cloud-cpp: array_record / riegeli GcsReader;
                                                            # it then uses anonymous (insecure) credentials
        "TENSORSTORE_GCS_HTTP_URL": endpoint,               # tensorstore's gcs kvstore driver (Orbax)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-token",  # tensorstore: a fixed bearer token, no auth lookup
        "GCE_METADATA_ROOT": _NO_METADATA,                  # tensorstore / google-cloud-cpp metadata server
        "GCE_METADATA_HOST": _NO_METADATA,                  # google-auth (python)
        "GCE_METADATA_IP": _NO_METADATA,
        "NO_GCE_CHECK": "True",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",        # gcsfs: plain HTTP GCSFileSystem, no gRPC layout calls
        "FSSPEC_GS_TOKEN": "anon",                           # gcsfs in a fresh process: no credential lookup (read
        "FSSPEC_GCS_TOKEN": "anon",                          # when fsspec is imported; _use_gcsfs sets it in-process)
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost", host])),
        "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy", ""), "127.0.0.1", "localhost", host])),
    }


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


@dataclasses.dataclass
class _Object:
    data: bytes
    generation: int
    content_type: str = "application/octet-stream"
    metadata: Optional[dict] = None
    metageneration: int = 1
    created: float = dataclasses.field(default_factory=time.time)

    def resource(self, bucket: str, name: str, endpoint: str) -> dict:
        md5 = base64.b64encode(hashlib.md5(self.data).digest()).decode()
        result = {
            "kind": "storage#object", "id": f"{bucket}/{name}/{self.generation}", "name": name, "bucket": bucket,
            "generation": str(self.generation), "metageneration": str(self.metageneration),
            "contentType": self.content_type, "size": str(len(self.data)), "md5Hash": md5,
            "etag": f"CO{self.generation}EAE=", "storageClass": "STANDARD",
            "timeCreated": _rfc3339(self.created), "updated": _rfc3339(self.created),
            "timeStorageClassUpdated": _rfc3339(self.created),
            "selfLink": f"{endpoint}/storage/v1/b/{bucket}/o/{quote(name, safe='')}",
            "mediaLink": f"{endpoint}/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
                         f"?generation={self.generation}&alt=media",
        }
        crc = _crc32c(self.data)
        if crc is not None:
            result["crc32c"] = crc
        if self.metadata:
            result["metadata"] = dict(self.metadata)
        return result


def _crc32c(data: bytes) -> Optional[str]:
    if google_crc32c is None:
        return None
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


class GcsError(Exception):
    def __init__(self, code: int, message: str, reason: str):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message, "errors": [
            {"domain": "global", "reason": self.reason, "message": self.message}]}}).encode()


def _not_found(bucket: str, name: Optional[str] = None) -> GcsError:
    if name is None:
        return GcsError(404, "The specified bucket does not exist.", "notFound")
    return GcsError(404, f"No such object: {bucket}/{name}", "notFound")


@dataclasses.dataclass
class _Upload:
    bucket: str
    name: str
    params: dict
    content_type: str
    metadata: Optional[dict]
    data: bytearray = dataclasses.field(default_factory=bytearray)


_KNOWN_PARAMS = {"alt", "prettyPrint", "fields", "userProject", "projection", "uploadType", "name", "upload_id",
                 "prefix", "delimiter", "pageToken", "maxResults", "includeTrailingDelimiter", "versions",
                 "startOffset", "endOffset", "generation", "ifGenerationMatch", "ifGenerationNotMatch",
                 "ifMetagenerationMatch", "ifMetagenerationNotMatch", "project", "predefinedAcl",
                 "destinationPredefinedAcl", "kmsKeyName", "contentEncoding", "softDeleted", "includeFoldersAsPrefixes",
                 "ifSourceGenerationMatch", "destinationKmsKeyName", "rewriteToken", "maxBytesRewrittenPerCall",
                 "sourceGeneration", "tensorstore"}          # tensorstore=<hash>: its cache buster


class FakeGcs:
    """The server. `requests` lists (method, path, sorted query keys, user agent) of every request, `unhandled` the
    descriptions of those answered 400."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.buckets: dict[str, dict[str, _Object]] = {}
        self.uploads: dict[str, _Upload] = {}
        self.requests: list[tuple[str, str, tuple[str, ...], str]] = []
        self.unhandled: list[str] = []
        self.verbose = verbose
        self._lock = threading.RLock()
        self._generation = int(time.time() * 1e6)
        self._httpd = _HttpServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    # ----------------------------------------------------------------------------------------------- control

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeGcs":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-gcs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> "FakeGcs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------- helpers

    def create_bucket(self, bucket: str) -> str:
        with self._lock:
            self.buckets.setdefault(bucket, {})
        return f"gs://{bucket}"

    def delete_bucket(self, bucket: str) -> None:
        with self._lock:
            self.buckets.pop(bucket, None)

    def put(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        with self._lock:
            self._store(bucket, name, bytes(data), content_type, None, {})
        return f"gs://{bucket}/{name}"

    def get(self, bucket: str, name: str) -> bytes:
        with self._lock:
            return self._object(bucket, name).data

    def delete(self, bucket: str, name: str) -> None:
        with self._lock:
            self._object(bucket, name)
            del self.buckets[bucket][name]

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._bucket(bucket) if n.startswith(prefix))

    # ------------------------------------------------------------------------------------------------- store

    def _bucket(self, bucket: str) -> dict[str, _Object]:
        if bucket not in self.buckets:
            raise _not_found(bucket)
        return self.buckets[bucket]

    def _object(self, bucket: str, name: str, generation: Optional[str] = None) -> _Object:
        obj = self._bucket(bucket).get(name)
        if obj is None or (generation is not None and str(obj.generation) != generation):
            raise _not_found(bucket, name)
        return obj

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    @staticmethod
    def _check_preconditions(obj: Optional[_Object], params: dict) -> None:
        """ifGenerationMatch (0: must not exist) / ifGenerationNotMatch / ifMetageneration*: 412 when unmet
        (ifGenerationNotMatch on a read is answered 304 by the caller)."""
        generation = obj.generation if obj else 0
        if "ifGenerationMatch" in params and int(params["ifGenerationMatch"]) != generation:
            raise GcsError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")
        if "ifGenerationNotMatch" in params and int(params["ifGenerationNotMatch"]) == generation:
            raise GcsError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")
        if obj is None and ("ifMetagenerationMatch" in params or "ifMetagenerationNotMatch" in params):
            raise _not_found("", "")
        if obj and "ifMetagenerationMatch" in params and int(params["ifMetagenerationMatch"]) != obj.metageneration:
            raise GcsError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")
        if obj and "ifMetagenerationNotMatch" in params and \
                int(params["ifMetagenerationNotMatch"]) == obj.metageneration:
            raise GcsError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")

    def _store(self, bucket: str, name: str, data: bytes, content_type: Optional[str], metadata: Optional[dict],
               params: dict) -> _Object:
        objects = self._bucket(bucket)
        if not name:
            raise GcsError(400, "Required parameter: name", "required")
        self._check_preconditions(objects.get(name), params)
        obj = _Object(data, self._next_generation(), content_type or "application/octet-stream", metadata)
        objects[name] = obj
        return obj

    def _list(self, bucket: str, params: dict) -> dict:
        objects = self._bucket(bucket)
        prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
        start, end = params.get("startOffset"), params.get("endOffset")
        trailing = params.get("includeTrailingDelimiter", "false").lower() == "true"
        token = params.get("pageToken")
        after = base64.urlsafe_b64decode(token.encode()).decode() if token else None
        limit = max(1, min(int(params.get("maxResults", 1000)), 1000))
        entries: list[tuple[str, Optional[str]]] = []          # (sort key, prefix or None for an object)
        seen_prefixes: set[str] = set()
        for name in sorted(objects):
            if not name.startswith(prefix) or (start and name < start) or (end and name >= end):
                continue
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                sub = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if sub not in seen_prefixes:
                    seen_prefixes.add(sub)
                    entries.append((sub, sub))
                if not (trailing and name == sub):
                    continue
            entries.append((name, None))
        entries.sort(key=lambda e: (e[0], e[1] is None))
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        page, rest_entries = entries[:limit], entries[limit:]
        result: dict[str, Any] = {"kind": "storage#objects"}
        items = [objects[key].resource(bucket, key, self.endpoint) for key, sub in page if sub is None]
        prefixes = [sub for _, sub in page if sub is not None]
        if items:
            result["items"] = items
        if prefixes:
            result["prefixes"] = prefixes
        if rest_entries:
            result["nextPageToken"] = base64.urlsafe_b64encode(page[-1][0].encode()).decode()
        return result


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):   # a client hanging up
            super().handle_error(request, client_address)


def _parse_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(first, last) inclusive of a "bytes=a-b" / "bytes=a-" / "bytes=-n" header; None: the whole object.
    GcsError 416 when it starts past the end."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or not (match[1] or match[2]):
        return None
    if not match[1]:
        first, last = max(0, size - int(match[2])), size - 1
    else:
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size:
        if size == 0:
            return None
        raise GcsError(416, "Request range not satisfiable", "requestedRangeNotSatisfiable")
    return first, last


def _multipart_parts(body: bytes, content_type: str) -> list[tuple[dict, bytes]]:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise GcsError(400, "multipart upload without a boundary", "invalid")
    delimiter = b"--" + match[1].encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, _, content = chunk.partition(b"\n\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        headers = {}
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def _handler_for(server: FakeGcs):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeGcs/1"

        def log_message(self, format: str, *args: Any) -> None:        # noqa: A002
            if server.verbose:
                sys.stderr.write("fake_gcs: " + format % args + "\n")

        # ------------------------------------------------------------------------------------------- plumbing

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, code: int, body: bytes = b"", content_type: str = "application/json; charset=UTF-8",
                  headers: Optional[dict] = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, value: Any, headers: Optional[dict] = None) -> None:
            self._send(code, json.dumps(value).encode(), headers=headers)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            with server._lock:
                server.requests.append((self.command, url.path, tuple(sorted(params)),
                                        self.headers.get("User-Agent", "")))
            body = self._body() if self.command in ("POST", "PUT", "PATCH") else b""
            try:
                unknown = set(params) - _KNOWN_PARAMS
                if unknown:
                    self._unhandled(f"unknown query parameters {sorted(unknown)}")
                    return
                if not self._route(url.path, params, body):
                    self._unhandled("no such route")
            except GcsError as error:
                self._send(error.code, error.body())
            except (BrokenPipeError, ConnectionResetError):
                pass                                      # the client hung up (e.g. a cancelled read): no reply
            except Exception as error:                                   # noqa: BLE001 -- a server bug: 500
                message = f"fake_gcs: {self.command} {self.path} raised {type(error).__name__}: {error}"
                sys.stderr.write(message + "\n")
                with server._lock:
                    server.unhandled.append(message)
                self._send(500, GcsError(500, message, "backendError").body())

        def _unhandled(self, why: str) -> None:
            message = f"FAKE GCS UNHANDLED ({why}): {self.command} {self.path} headers={dict(self.headers)}"
            sys.stderr.write(message + "\n")
            with server._lock:
                server.unhandled.append(message)
            self._send(400, GcsError(400, message, "notImplemented").body())   # 400: not retried

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

        # --------------------------------------------------------------------------------------------- routes

        def _route(self, path: str, params: dict, body: bytes) -> bool:
            method = self.command
            raw = path
            if method == "POST" and re.fullmatch(r"/storage/v1/b/?", raw):
                name = json.loads(body or b"{}").get("name")
                if not name:
                    raise GcsError(400, "bucket name required", "required")
                with server._lock:
                    if name in server.buckets:
                        raise GcsError(409, "Your previous request to create the named bucket succeeded and you "
                                       "already own it.", "conflict")
                    server.buckets[name] = {}
                self._json(200, self._bucket_resource(name))
                return True
            if method == "GET" and re.fullmatch(r"/storage/v1/b/?", raw):
                with server._lock:
                    names = sorted(server.buckets)
                self._json(200, {"kind": "storage#buckets", "items": [self._bucket_resource(n) for n in names]})
                return True
            match = re.fullmatch(r"/storage/v1/b/([^/]+)/?", raw)
            if match and method in ("GET", "HEAD", "DELETE"):
                bucket = unquote(match[1])
                with server._lock:
                    objects = server._bucket(bucket)
                    if method == "DELETE":
                        if objects:
                            raise GcsError(409, "The bucket you tried to delete is not empty.", "conflict")
                        del server.buckets[bucket]
                if method == "DELETE":
                    self._send(204)
                else:
                    self._json(200, self._bucket_resource(bucket))
                return True
            match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/?", raw)
            if match and method == "GET":
                with server._lock:
                    result = server._list(unquote(match[1]), params)
                self._json(200, result)
                return True
            match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/compose", raw)
            if match and method == "POST":
                self._compose(unquote(match[1]), unquote(match[2]), params, body)
                return True
            match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)", raw)
            if match and method == "POST":
                self._copy(unquote(match[1]), unquote(match[2]), unquote(match[4]), unquote(match[5]),
                           match[3], params, body)
                return True
            match = re.fullmatch(r"(/download)?/storage/v1/b/([^/]+)/o/(.+)", raw)
            if match and method in ("GET", "HEAD"):
                self._get_object(unquote(match[2]), unquote(match[3]), params, media=bool(match[1]))
                return True
            if match and not match[1] and method == "DELETE":
                bucket, name = unquote(match[2]), unquote(match[3])
                with server._lock:
                    obj = server._object(bucket, name, params.get("generation"))
                    server._check_preconditions(obj, params)
                    del server.buckets[bucket][name]
                self._send(204)
                return True
            if match and not match[1] and method == "PATCH":
                bucket, name = unquote(match[2]), unquote(match[3])
                update = json.loads(body or b"{}")
                with server._lock:
                    obj = server._object(bucket, name)
                    server._check_preconditions(obj, params)
                    if "metadata" in update:
                        obj.metadata = {**(obj.metadata or {}), **(update["metadata"] or {})}
                    if "contentType" in update:
                        obj.content_type = update["contentType"]
                    obj.metageneration += 1
                    resource = obj.resource(bucket, name, server.endpoint)
                self._json(200, resource)
                return True
            match = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o/?", raw)
            if match and method in ("POST", "PUT"):
                self._upload(unquote(match[1]), params, body)
                return True
            return False

        @staticmethod
        def _bucket_resource(bucket: str) -> dict:
            return {"kind": "storage#bucket", "id": bucket, "name": bucket, "location": "US",
                    "storageClass": "STANDARD", "metageneration": "1", "projectNumber": "0",
                    "timeCreated": _rfc3339(0), "updated": _rfc3339(0), "etag": "CAE="}

        def _get_object(self, bucket: str, name: str, params: dict, media: bool) -> None:
            with server._lock:
                obj = server._object(bucket, name, params.get("generation"))
                data, generation = obj.data, obj.generation
                resource = obj.resource(bucket, name, server.endpoint)
            not_match = params.get("ifGenerationNotMatch")
            if not_match is not None and int(not_match) == generation:
                self._send(304, headers={"x-goog-generation": str(generation), "ETag": resource["etag"]})
                return
            server._check_preconditions(obj, {k: v for k, v in params.items() if k != "ifGenerationNotMatch"})
            if not (media or params.get("alt") == "media"):
                self._json(200, resource)
                return
            headers = {"x-goog-generation": str(generation), "x-goog-metageneration": str(obj.metageneration),
                       "x-goog-stored-content-length": str(len(data)), "x-goog-stored-content-encoding": "identity",
                       "ETag": resource["etag"], "Accept-Ranges": "bytes",
                       "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(obj.created))}
            byte_range = _parse_range(self.headers.get("Range"), len(data))
            if byte_range is None:
                hashes = [f"md5={resource['md5Hash']}"] + ([f"crc32c={resource['crc32c']}"]
                                                          if "crc32c" in resource else [])
                headers["x-goog-hash"] = ",".join(hashes)
                self._send(200, data, obj.content_type, headers)
                return
            first, last = byte_range
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            self._send(206, data[first:last + 1], obj.content_type, headers)

        def _finish_upload(self, bucket: str, name: str, data: bytes, content_type: Optional[str],
                           metadata: Optional[dict], params: dict) -> None:
            with server._lock:
                obj = server._store(bucket, name, data, content_type, metadata, params)
                resource = obj.resource(bucket, name, server.endpoint)
            self._json(200, resource)

        def _upload(self, bucket: str, params: dict, body: bytes) -> None:
            kind = params.get("uploadType", "media" if "upload_id" not in params else "resumable")
            with server._lock:
                server._bucket(bucket)
            if kind == "media":
                self._finish_upload(bucket, params.get("name", ""), body, self.headers.get("Content-Type"), None,
                                    params)
            elif kind == "multipart":
                parts = _multipart_parts(body, self.headers.get("Content-Type", ""))
                if len(parts) != 2:
                    raise GcsError(400, f"multipart upload with {len(parts)} parts", "invalid")
                meta = json.loads(parts[0][1] or b"{}")
                self._finish_upload(bucket, meta.get("name") or params.get("name", ""), parts[1][1],
                                    meta.get("contentType") or parts[1][0].get("content-type"),
                                    meta.get("metadata"), params)
            elif kind == "resumable" and "upload_id" not in params:
                meta = json.loads(body or b"{}")
                upload_id = uuid.uuid4().hex
                upload = _Upload(bucket, meta.get("name") or params.get("name", ""), params,
                                 meta.get("contentType") or self.headers.get("X-Upload-Content-Type")
                                 or "application/octet-stream", meta.get("metadata"))
                with server._lock:
                    server.uploads[upload_id] = upload
                location = f"{server.endpoint}/upload/storage/v1/b/{quote(bucket)}/o?uploadType=resumable" \
                           f"&upload_id={upload_id}"
                self._send(200, b"", headers={"Location": location, "X-GUploader-UploadID": upload_id})
            elif kind == "resumable":
                self._resumable_chunk(params["upload_id"], body)
            else:
                self._unhandled(f"uploadType={kind}")

        def _resumable_chunk(self, upload_id: str, body: bytes) -> None:
            with server._lock:
                upload = server.uploads.get(upload_id)
            if upload is None:
                raise GcsError(404, f"no resumable upload {upload_id}", "notFound")
            if self.command == "DELETE":
                server.uploads.pop(upload_id, None)
                self._send(499)
                return
            content_range = self.headers.get("Content-Range", "")
            match = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", content_range.strip()) if content_range \
                else None
            if content_range and not match:
                raise GcsError(400, f"bad Content-Range {content_range!r}", "invalid")
            if match and match[1] is not None:
                first = int(match[1])
                if first != len(upload.data):
                    upload.data = upload.data[:first]
                upload.data += body
            elif not match:
                upload.data += body
            total = match[3] if match else str(len(upload.data))
            if total != "*" and int(total) == len(upload.data):
                with server._lock:
                    server.uploads.pop(upload_id, None)
                self._finish_upload(upload.bucket, upload.name, bytes(upload.data), upload.content_type,
                                    upload.metadata, upload.params)
                return
            headers = {"Range": f"bytes=0-{len(upload.data) - 1}"} if upload.data else {}
            self._send(308, headers=headers)

        def _compose(self, bucket: str, name: str, params: dict, body: bytes) -> None:
            request = json.loads(body or b"{}")
            with server._lock:
                data = b"".join(server._object(bucket, source["name"], str(source["generation"])
                                               if "generation" in source else None).data
                                for source in request.get("sourceObjects", []))
                destination = request.get("destination") or {}
                obj = server._store(bucket, name, data, destination.get("contentType"),
                                    destination.get("metadata"), params)
                resource = obj.resource(bucket, name, server.endpoint)
            self._json(200, resource)

        def _copy(self, bucket: str, name: str, to_bucket: str, to_name: str, kind: str, params: dict,
                  body: bytes) -> None:
            with server._lock:
                source = server._object(bucket, name, params.get("sourceGeneration"))
                obj = server._store(to_bucket, to_name, source.data, source.content_type, source.metadata, params)
                resource = obj.resource(to_bucket, to_name, server.endpoint)
            if kind == "copyTo":
                self._json(200, resource)
            else:
                self._json(200, {"kind": "storage#rewriteResponse", "totalBytesRewritten": resource["size"],
                                 "objectSize": resource["size"], "done": True, "resource": resource})

    return Handler


# ---------------------------------------------------------------------------------------------- pytest fixture

_SESSION: dict[str, Any] = {}


def _session_server() -> FakeGcs:
    """One server per process: its endpoint never changes, so whatever a C++ client keeps from its first gs://
    use (tensorstore's auth provider) stays valid for every test."""
    if "server" not in _SESSION:
        _SESSION["server"] = FakeGcs(verbose=bool(os.environ.get("FAKE_GCS_VERBOSE"))).start()
    return _SESSION["server"]


class FakeGcsHandle:
    """What the fixture gives a test: the server, its endpoint, a fresh bucket and byte helpers."""

    def __init__(self, server: FakeGcs, bucket: str):
        self.server, self.bucket, self.endpoint = server, bucket, server.endpoint
        self.env = gcs_env(server.endpoint)

    def url(self, name: str = "") -> str:
        return f"gs://{self.bucket}/{name}" if name else f"gs://{self.bucket}"

    def put(self, name: str, data: bytes) -> str:
        return self.server.put(self.bucket, name, data)

    def get(self, name: str) -> bytes:
        return self.server.get(self.bucket, name)

    def names(self, prefix: str = "") -> list[str]:
        return self.server.names(self.bucket, prefix)


def _forget_cached_file_systems() -> None:
    """etils.epath keeps the first file system it made for gs:// (an lru_cache); fsspec keeps instances too."""
    from etils.epath import backend
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    import gcsfs.core
    gcsfs.core.GCSFileSystem.clear_instance_cache()


def _use_gcsfs() -> None:
    """fsspec's "gs"/"gcs" -> gcsfs's plain HTTP GCSFileSystem, anonymous, nothing cached from before (other
    tests register an in-memory file system under these names)."""
    import fsspec
    import gcsfs.core
    _forget_cached_file_systems()
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"


def _unregister(protocol: str) -> None:
    import importlib
    importlib.import_module("fsspec.registry")._registry.pop(protocol, None)     # fsspec.registry: a read-only view


@pytest.fixture
def fake_gcs(monkeypatch):
    """A fresh empty bucket on the session's fake GCS server, the env pointing every client at it for the test (see
    the module docstring); fails the test if the server met a request it does not implement."""
    import fsspec
    server = _session_server()
    for key, value in gcs_env(server.endpoint).items():
        monkeypatch.setenv(key, value)
    before = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    conf_before = {p: dict(fsspec.config.conf.get(p, {})) for p in ("gs", "gcs")}
    _use_gcsfs()
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    unhandled_before = len(server.unhandled)
    yield FakeGcsHandle(server, bucket)
    server.delete_bucket(bucket)
    for protocol in ("gs", "gcs"):
        if before[protocol] is not None:
            fsspec.register_implementation(protocol, before[protocol], clobber=True)
        else:
            _unregister(protocol)
        fsspec.config.conf[protocol] = conf_before[protocol]
    _forget_cached_file_systems()
    new = server.unhandled[unhandled_before:]
    assert not new, "the fake GCS server met requests it does not implement:\n" + "\n".join(new)
