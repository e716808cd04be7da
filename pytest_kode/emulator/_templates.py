"""Template builds for the emulator: the routes ``e2b.Template.build`` calls, and the build.

The SDK registers a build (``POST /v3/templates``), asks where to upload COPY contexts
(``GET /templates/{id}/files/{hash}``, then ``PUT``s a tar to the URL it got), starts the build
with its steps (``POST /v2/templates/{id}/builds/{buildID}``) and polls
``GET /templates/{id}/builds/{buildID}/status?logsOffset=`` for logs until ``ready``/``error``.
``Template.exists`` asks ``GET /templates/aliases/{alias}``.

A build is applied where this machine can: the SDK's steps are read back into pytest-kode build
steps (``apt-get install`` → a check that the host has the packages, ``pip install`` → the
template's venv, ``npm install -g`` → its npm prefix, other ``RUN`` → a command inside the
sandbox isolation, ``WORKDIR``, ``ENV``) and built by the local template builder, cached by a
hash of the steps. Sandboxes created from the template then start from a copy of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import io
import json
import posixpath
import re
import secrets
import shlex
import shutil
import tarfile
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

from pytest_kode.emulator._http import Request, Response, error_response, json_response
from pytest_kode.emulator._state import WORK_DIR, Registry

__all__ = ["handle", "is_template_path"]

_ID = r"(?P<id>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/v3/templates"), "template.request"),
    ("GET", re.compile(rf"/templates/{_ID}/files/(?P<hash>[^/]+)"), "template.files"),
    ("PUT", re.compile(rf"/templates/{_ID}/uploads/(?P<hash>[^/]+)"), "template.upload"),
    ("POST", re.compile(rf"/v2/templates/{_ID}/builds/(?P<build>[^/]+)"), "template.build"),
    ("GET", re.compile(rf"/templates/{_ID}/builds/(?P<build>[^/]+)/status"), "template.status"),
    ("GET", re.compile(r"/templates/aliases/(?P<alias>[^/]+)"), "template.alias"),
    ("POST", re.compile(r"/templates/tags"), "template.tags.assign"),
    ("DELETE", re.compile(r"/templates/tags"), "template.tags.remove"),
    ("GET", re.compile(rf"/templates/{_ID}/tags"), "template.tags"),
]
_PAGE = 100
_APT = re.compile(r"apt-get update && .*apt-get install -y (?P<pkgs>.+)")
_PIP = re.compile(r"pip install (?P<pkgs>.+)")
_NPM = re.compile(r"npm install -g (?P<pkgs>.+)")


def is_template_path(path: str) -> bool:
    return path.startswith(("/templates/", "/v3/templates", "/v2/templates/"))


@dataclasses.dataclass
class _Build:
    template_id: str
    build_id: str
    names: list[str]
    status: str = "waiting"
    logs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    reason: str | None = None
    reason_step: int | None = None

    def log(self, message: str, level: str = "info") -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        self.logs.append({"timestamp": now, "level": level, "message": message})


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.builds: dict[tuple[str, str], _Build] = {}
        self.names: dict[str, str] = {}  # name/alias -> template id, from the build request
        self.ready: set[str] = set()  # template ids with a finished build
        # "name:tag" -> (build id, when tagged); a name without a tag is "name:default".
        self.tags: dict[str, tuple[str, datetime.datetime]] = {}
        self.uploads: dict[tuple[str, str], bytes] = {}


_stores: weakref.WeakKeyDictionary[Registry, _Store] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def _store(registry: Registry) -> _Store:
    with _stores_lock:
        store = _stores.get(registry)
        if store is None:
            store = _stores[registry] = _Store()
        return store


async def handle(registry: Registry, api_key: str, request: Request) -> Response | None:
    """Answer a template request, or None when the path is not one of ours."""
    for method, pattern, name in _ROUTES:
        match = pattern.fullmatch(request.path)
        if match is None or method != request.method:
            continue
        registry.calls[name] += 1
        store = _store(registry)
        groups = match.groupdict()
        if name == "template.upload":
            # A presigned URL: the token in the query stands in for the API key.
            return await _upload(store, request, groups["id"], groups["hash"])
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return error_response(
                401,
                "Invalid API key: the emulator expects the key it printed (E2B_API_KEY) "
                "in the X-API-KEY header",
            )
        if name == "template.request":
            return await _request(store, request)
        if name == "template.files":
            return _files(store, request, groups["id"], groups["hash"])
        if name == "template.build":
            return await _start(registry, store, request, groups["id"], groups["build"])
        if name == "template.status":
            return _status(store, request, groups["id"], groups["build"])
        if name == "template.tags.assign":
            return await _assign_tags(registry, store, request)
        if name == "template.tags.remove":
            return await _remove_tags(registry, store, request)
        if name == "template.tags":
            return _list_tags(store, groups["id"])
        return _alias(registry, store, groups["alias"])
    return None


async def _request(store: _Store, request: Request) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "request body is not valid JSON")
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        return error_response(400, "name is required: Template.build(template, name='...')")
    problem = _resources_problem(body)
    if problem is not None:
        return error_response(400, problem)
    with store.lock:
        template_id = store.names.get(name) or "tpl" + secrets.token_hex(8)
        build = _Build(template_id, str(uuid.uuid4()), [name])
        store.builds[(template_id, build.build_id)] = build
        # The cloud registers the name with the build *request* (infra register_build.go), so
        # Template.exists() is true from here on, while sandboxes need a finished build.
        store.names[name] = template_id
    tags = body.get("tags") or []
    return json_response(
        202,
        {
            "templateID": template_id,
            "buildID": build.build_id,
            "public": False,
            "names": [name],
            "tags": tags if isinstance(tags, list) else [],
            "aliases": [name],
        },
    )


def _resources_problem(body: dict[str, Any]) -> str | None:
    """What the cloud refuses in ``cpuCount``/``memoryMB`` (infra ``team/limits.go``)."""
    cpu, memory = body.get("cpuCount"), body.get("memoryMB")
    if cpu is not None and (
        isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 1 or (cpu != 1 and cpu % 2)
    ):
        return f"CPU count must be 1 or an even number, got {cpu!r}"
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 128:
            return f"memory must be at least 128 MiB, got {memory!r}"
        if memory % 2:
            return f"memory must be an even number of MiB, got {memory!r}"
    return None


def _files(store: _Store, request: Request, template_id: str, files_hash: str) -> Response:
    with store.lock:
        present = (template_id, files_hash) in store.uploads
    host = request.headers.get("host", "127.0.0.1")
    token = _upload_token(template_id, files_hash)
    url = f"http://{host}/templates/{template_id}/uploads/{files_hash}?token={token}"
    return json_response(201, {"present": present, "url": url})


_SECRET = secrets.token_bytes(16)


def _upload_token(template_id: str, files_hash: str) -> str:
    return hmac.new(_SECRET, f"{template_id}/{files_hash}".encode(), hashlib.sha256).hexdigest()


async def _upload(store: _Store, request: Request, template_id: str, files_hash: str) -> Response:
    if not hmac.compare_digest(request.arg("token") or "", _upload_token(template_id, files_hash)):
        return error_response(403, "upload URL signature does not match; ask for a new one")
    data = await request.body()
    with store.lock:
        store.uploads[(template_id, files_hash)] = data
    return Response(200)


async def _start(
    registry: Registry, store: _Store, request: Request, template_id: str, build_id: str
) -> Response:
    with store.lock:
        build = store.builds.get((template_id, build_id))
    if build is None:
        return error_response(404, f"build {build_id} of template {template_id} does not exist")
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    build.status = "building"
    registry.run_worker(
        lambda: _run_build(registry, store, build, body), name=f"kode-template-build-{build_id}"
    )
    await asyncio.sleep(0)
    return Response(202)


def _status(store: _Store, request: Request, template_id: str, build_id: str) -> Response:
    with store.lock:
        build = store.builds.get((template_id, build_id))
        if build is None:
            return error_response(404, f"build {build_id} of template {template_id} does not exist")
        try:
            offset = max(0, int(request.arg("logsOffset") or 0))
        except ValueError:
            offset = 0
        entries = build.logs[offset : offset + _PAGE]
        payload: dict[str, Any] = {
            "templateID": template_id,
            "buildID": build_id,
            "status": build.status,
            "logs": [entry["message"] for entry in entries],
            "logEntries": entries,
        }
        if build.reason is not None:
            payload["reason"] = {"message": build.reason}
            if build.reason_step is not None:
                # Which step failed: the SDK points its BuildException at that line of the
                # user's template code.
                payload["reason"]["step"] = str(build.reason_step)
    return json_response(200, payload)


def _alias(registry: Registry, store: _Store, alias: str) -> Response:
    with store.lock:
        template_id = store.names.get(alias)
    if template_id is None and alias in registry.templates:
        template_id = alias  # one the emulator has without a build (`base`, add_template)
    if template_id is None:
        return error_response(404, f"template '{alias}' not found")
    return json_response(200, {"templateID": template_id, "public": False})


# -- tags -------------------------------------------------------------------------------------
def _split_tag(name: str) -> tuple[str, str]:
    base, sep, tag = name.rpartition(":")
    return (base, tag) if sep else (name, "default")


async def _json_object(request: Request) -> dict[str, Any] | Response:
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    return body


def _tag_names(base: str, raw: object) -> list[str] | Response:
    """The tag portions of ``raw`` (each a tag or "name:tag" for ``base``), or a 400."""
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        return error_response(400, "tags must be a non-empty list of strings")
    tags = []
    for item in raw:
        alias, sep, tag = item.rpartition(":")
        if sep and (not alias or not tag):
            return error_response(400, f"invalid tag {item!r}: use 'tag' or 'name:tag'")
        if sep and alias != base:
            return error_response(400, f"tag {item!r} names another template than {base!r}")
        if not (tag if sep else item).strip():
            return error_response(400, f"invalid tag {item!r}: it is empty")
        tags.append(tag if sep else item)
    return tags


async def _assign_tags(registry: Registry, store: _Store, request: Request) -> Response:
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    target = body.get("target")
    if not isinstance(target, str) or not target:
        return error_response(400, "target ('name:tag' of an existing build) is required")
    base, tag = _split_tag(target)
    tags = _tag_names(base, body.get("tags"))
    if isinstance(tags, Response):
        return tags
    with store.lock:
        found = store.tags.get(f"{base}:{tag}")
        if found is None:
            return error_response(404, f"template '{target}' not found")
        build_id = found[0]
        template_id = store.names[base]
        now = datetime.datetime.now(datetime.UTC)
        for new in tags:
            store.tags[f"{base}:{new}"] = (build_id, now)
            store.names[f"{base}:{new}"] = template_id
    for new in tags:
        registry.templates.add(f"{base}:{new}")
        if target in registry.local_templates:
            registry.local_templates[f"{base}:{new}"] = registry.local_templates[target]
    return json_response(201, {"buildID": build_id, "tags": tags})


async def _remove_tags(registry: Registry, store: _Store, request: Request) -> Response:
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    name = body.get("name")
    if not isinstance(name, str) or not name:
        return error_response(400, "name (the template's name) is required")
    tags = _tag_names(name, body.get("tags"))
    if isinstance(tags, Response):
        return tags
    with store.lock:
        if name not in store.names:
            return error_response(404, f"template '{name}' not found")
        for tag in tags:
            store.tags.pop(f"{name}:{tag}", None)
            store.names.pop(f"{name}:{tag}", None)
    for tag in tags:
        registry.templates.discard(f"{name}:{tag}")
    return Response(204)


def _list_tags(store: _Store, template: str) -> Response:
    with store.lock:
        template_id = store.names.get(template, template)
        bases = {n for n, t in store.names.items() if t == template_id and ":" not in n}
        found = [
            {"tag": key.rpartition(":")[2], "buildID": build_id, "createdAt": _iso(when)}
            for key, (build_id, when) in store.tags.items()
            if key.rpartition(":")[0] in bases
        ]
    if not found:
        return error_response(404, f"template '{template}' not found")
    return json_response(200, found)


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# -- building ---------------------------------------------------------------------------------
def _run_build(registry: Registry, store: _Store, build: _Build, body: dict[str, Any]) -> None:
    from pytest_kode.errors import KodeError

    tracker = _StepTracker()
    try:
        template = _build_locally(store, build, body, tracker)
    except _StepFailure as exc:
        _fail(store, build, str(exc), exc.step)
        return
    except KodeError as exc:
        _fail(store, build, exc.message + (f" -- {exc.hint}" if exc.hint else ""), tracker.step)
        return
    except Exception as exc:  # noqa: BLE001 - reported to the SDK as the build's error
        _fail(store, build, f"{type(exc).__name__}: {exc}", tracker.step)
        return
    with store.lock:
        for name in [*build.names, build.template_id]:
            store.names[name] = build.template_id
        now = datetime.datetime.now(datetime.UTC)
        for name in build.names:
            base, tag = _split_tag(name)
            store.names[base] = build.template_id
            store.tags[f"{base}:{tag}"] = (build.build_id, now)
        build.status = "ready"
        store.ready.add(build.template_id)
    for name in [*build.names, build.template_id]:
        registry.templates.add(name)
        registry.local_templates[name] = template


def _fail(store: _Store, build: _Build, message: str, step: int | None = None) -> None:
    with store.lock:
        build.log(message, "error")
        build.reason = message
        build.reason_step = step
        build.status = "error"


class _StepFailure(Exception):
    """A build step the emulator refuses before running anything; ``step`` as E2B counts:
    0 is the base image, 1.. the template's steps in order."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


class _StepTracker:
    """Follows a running build through its log, so a failure names the step it happened in.

    The local builder announces every step it runs in the sandbox as ``$ <command>``; the
    steps' announcements are known in advance (``expect``), in order.
    """

    def __init__(self) -> None:
        self._announced: list[tuple[str, int]] = []  # (announcement, E2B step number)
        self._next = 0
        self.step: int | None = None

    def expect(self, announcements: list[tuple[str, int]]) -> None:
        self._announced = announcements

    def saw(self, line: str) -> None:
        for index in range(self._next, len(self._announced)):
            if self._announced[index][0] == line:
                self.step = self._announced[index][1]
                self._next = index + 1
                return


def _build_locally(
    store: _Store, build: _Build, body: dict[str, Any], tracker: _StepTracker
) -> Any:
    # COPY steps' uploads are unpacked here for the length of the build.
    with tempfile.TemporaryDirectory(prefix="kode-emu-context-") as context:
        return _build_steps(store, build, body, Path(context), tracker)


def _build_steps(
    store: _Store, build: _Build, body: dict[str, Any], context: Path, tracker: _StepTracker
) -> Any:
    from pytest_kode._template_local import BuildStep, LocalTemplateBuilder
    from pytest_kode.backends.local._network import agent_python

    steps, venv, origins = _steps(store, build, body, context)
    tracker.expect(
        [
            (f"$ {_announcement(kind, args)}", origin)
            for (kind, args), origin in zip(steps, origins, strict=True)
            if kind in ("run", "pip", "npm")
        ]
    )
    digest = (
        "emu-"
        + hashlib.sha256(
            json.dumps({k: v for k, v in body.items() if k != "force"}, sort_keys=True).encode()
        ).hexdigest()[:16]
    )
    forced = body.get("force") or any(
        isinstance(step, dict) and step.get("force") for step in body.get("steps") or []
    )
    if forced:
        digest += "-" + build.build_id  # skip_cache(): build again, whatever was built before

    def log(line: str) -> None:
        tracker.saw(line)
        with store.lock:
            build.log(line)

    builder = LocalTemplateBuilder(on_log=log)
    return builder.prepare_steps(
        digest,
        [BuildStep(kind, args) for kind, args in steps],  # type: ignore[arg-type]
        work_dir=WORK_DIR,
        python=agent_python() if venv else None,
        venv=venv,
        login_profile=True,
    )


def _copy_source(
    store: _Store, build: _Build, raw: dict[str, Any], args: list[str], context: Path
) -> tuple[str, str, str]:
    """A COPY step's files, from the tar the SDK uploaded: unpacked (as E2B does, refusing
    members that land outside the context and device files; symbolic links stay links, an
    absolute or dangling one too, as Docker's COPY keeps them) and handed to the local build
    as a copy."""
    files_hash = raw.get("filesHash")
    if len(args) < 2 or not isinstance(files_hash, str):
        raise ValueError(f"COPY step without source/destination or filesHash: {raw!r}")
    with store.lock:
        data = store.uploads.get((build.template_id, files_hash))
    if data is None:
        raise ValueError(
            f"COPY {args[0]} {args[1]}: no files uploaded for hash {files_hash} (the SDK "
            "uploads them to the URL GET /templates/{id}/files/{hash} returns)"
        )
    if any(args[2:4]):
        with store.lock:
            build.log(f"COPY {args[0]}: user/mode {args[2:4]} ignored (files keep their modes)")
    target = context / files_hash
    if not target.exists():
        target.mkdir()
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
                archive.extractall(target, filter=_copy_member)
        except (tarfile.TarError, OSError) as exc:
            raise ValueError(f"COPY {args[0]}: the uploaded archive is unusable: {exc}") from exc
    if _GLOB_CHARS.search(args[0]):
        return (str(_glob_matches(target, args[0])), args[1], "")
    source = (target / args[0]).resolve()
    if not source.is_relative_to(target.resolve()) or not source.exists():
        raise ValueError(f"COPY {args[0]}: not in the uploaded files")
    return (str(source), args[1], "")


_GLOB_CHARS = re.compile(r"[*?\[]")


def _glob_matches(target: Path, pattern: str) -> Path:
    """A COPY source with wildcards (``folder/*``): a directory beside the unpacked files with
    what it matches, each under its own name (a directory with its tree, a link as a link),
    which the local build copies into the destination, as ``cp -a folder/* dest/`` would."""
    if pattern.startswith("/") or ".." in Path(pattern).parts:
        raise ValueError(f"COPY {pattern}: not in the uploaded files")
    staged = target.with_name(
        f"{target.name}.glob-{hashlib.sha256(pattern.encode()).hexdigest()[:16]}"
    )
    if staged.exists():
        return staged
    matches = sorted(target.glob(pattern))
    if not matches:
        raise ValueError(f"COPY {pattern}: matches nothing in the uploaded files")
    partial = staged.with_name(staged.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for match in matches:
        if match.is_dir() and not match.is_symlink():
            shutil.copytree(match, partial / match.name, symlinks=True)
        else:
            shutil.copy2(match, partial / match.name, follow_symlinks=False)
    partial.rename(staged)
    return staged


def _copy_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``tar`` filter (no member outside ``dest``, not even through a link extracted
    before it; no setuid bits), and no device files or FIFOs. Unlike the ``data`` filter, it
    keeps links whose target is absolute: they point into the sandbox, not at this host."""
    if member.isdev():
        raise tarfile.FilterError(f"{member.name!r} is a device file or FIFO")
    return tarfile.tar_filter(member, dest)


def _announcement(kind: str, args: tuple[str, ...]) -> str:
    return args[0] if kind == "run" else f"{kind} install {' '.join(args)}"


def _check_user(step: int, command: str, user: str) -> None:
    """A RUN step's user must exist, as envd refuses unknown ones (the base image's: root,
    user; the emulator's userland is this machine's, so its accounts count too)."""
    import pwd

    if user in ("root", "user"):
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise _StepFailure(
            step,
            f"failed to run command '{command}': command failed: unauthenticated: "
            f"invalid username: '{user}'",
        ) from None


def _steps(
    store: _Store, build: _Build, body: dict[str, Any], context: Path
) -> tuple[list[tuple[str, tuple[str, ...]]], bool, list[int]]:
    """The SDK's instructions read back as build steps, with the E2B step number of each;
    raises _StepFailure for what the emulator cannot do."""
    image = body.get("fromImage")
    base = body.get("fromTemplate")
    if body.get("fromImageRegistry"):
        raise _StepFailure(0, "the emulator cannot pull from a private image registry")
    if isinstance(base, str) and base not in ("base",) and store.names.get(base) not in store.ready:
        raise _StepFailure(0, f"fromTemplate {base!r} is not a template this emulator has built")
    venv = isinstance(image, str) and image.startswith("python")
    tools = _base_tools(image, base)
    with store.lock:
        build.log(f"base image {image or base or 'base'}: applied as this machine's userland")
    steps: list[tuple[str, tuple[str, ...]]] = []
    origins: list[int] = []
    for number, raw in enumerate(body.get("steps") or [], start=1):
        kind, args = raw.get("type"), [str(arg) for arg in raw.get("args") or []]
        if kind == "RUN":
            command = args[0] if args else ""
            if len(args) > 1:
                _check_user(number, command, args[1])
            for pattern, step in ((_APT, "apt"), (_PIP, "pip"), (_NPM, "npm")):
                match = pattern.fullmatch(command)
                if match is not None:
                    if step != "apt" and step not in tools:
                        # What `bash -l -c` says in an image without the tool.
                        raise ValueError(
                            f"bash: line 1: {step}: command not found (exit status 127): the "
                            f"base image {image or base!r} has no {step}; install it first "
                            f"or start from a {'python' if step == 'pip' else 'node'} image"
                        )
                    # Options stay (--no-deps, --install-links, ...), but the local build
                    # installs into the template's venv / npm prefix: --user and -g go.
                    words = _shell_words(match["pkgs"])
                    drop = ("--user",) if step == "pip" else ("-g", "--global")
                    keep = [w for w in words if w not in drop]
                    if step == "apt":
                        tools |= _tools_from_apt(tuple(keep))
                    steps.append((step, tuple(keep)))
                    break
            else:
                steps.append(("run", (_login_shell(command),)))
        elif kind == "COPY":
            try:
                steps.append(("copy", _copy_source(store, build, raw, args, context)))
            except ValueError as exc:
                raise _StepFailure(number, str(exc)) from exc
        elif kind == "WORKDIR":
            workdir = posixpath.normpath(args[0]) if args else WORK_DIR
            if workdir == WORK_DIR or workdir.startswith(WORK_DIR + "/"):
                steps.append(("workdir", (workdir,)))
            else:
                # The SDK starts every Dockerfile with WORKDIR /; a local template keeps its
                # files below the sandbox's work_dir, so later commands run there.
                with store.lock:
                    build.log(f"WORKDIR {workdir}: applied as {WORK_DIR}", "warn")
                steps.append(("workdir", (WORK_DIR,)))
        elif kind == "ENV":
            steps.append(("env", tuple(args)))
        elif kind == "USER":
            with store.lock:
                build.log(f"USER {' '.join(args)}: ignored (local sandboxes run as you)", "warn")
            continue
        else:
            raise _StepFailure(
                number, f"the emulator does not apply {kind} steps ({' '.join(args)})"
            )
        origins.append(number)
    for key in ("startCmd", "readyCmd"):
        if body.get(key):
            with store.lock:
                build.log(f"{key} {body[key]!r}: not run by the emulator", "warn")
    return steps, venv, origins


def _base_tools(image: object, base: object) -> set[str]:
    """Which of pip and npm the base image ships: ``python:*`` has pip, ``node:*`` npm, plain
    ``debian``/``ubuntu`` neither; E2B's own base template (``e2bdev/base``) both."""
    if isinstance(image, str):
        name = image.rsplit("/", 1)[-1]
        if name.startswith("python"):
            return {"pip"}
        if name.startswith("node"):
            return {"npm"}
        if image.startswith("e2bdev/base"):
            return {"pip", "npm"}
        return set()
    return {"pip", "npm"}  # fromTemplate: E2B's base and templates built on it


def _tools_from_apt(packages: tuple[str, ...]) -> set[str]:
    found = set()
    if any(p.split("=")[0] in ("python3-pip", "python-pip") for p in packages):
        found.add("pip")
    if any(p.split("=")[0] in ("npm", "nodejs") for p in packages):
        found.add("npm")
    return found


def _shell_words(text: str) -> list[str]:
    """``text`` split as the cloud's ``bash -l -c`` splits it: quotes removed, an unquoted
    ``pandas>=2.0`` loses its constraint to a redirection (bash writes a file ``=2.0``) and
    ``numpy<2`` fails. Read with shlex in bash's terms rather than run by a shell on this
    machine, so nothing in a package list can execute here."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars="<>|&;()")
    lexer.whitespace_split = True
    tokens = list(lexer)
    words: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in (">", ">>", "<"):
            target = tokens[index + 1] if index + 1 < len(tokens) else ""
            if token == "<" or not target:
                raise ValueError(
                    f"bash: line 1: {target or 'syntax error near newline'}: No such file or "
                    f"directory (in {text!r}: quote package specs with < or >, e.g. shlex.quote)"
                )
            index += 2  # bash redirects the output to a file and drops the word
            continue
        if token and set(token) <= set("<>|&;()"):
            raise ValueError(
                f"the package list {text!r} holds shell syntax {token!r}: quote each package "
                "(shlex.quote); the emulator does not run package lists through a shell here"
            )
        words.append(token)
        index += 1
    return words


def _login_shell(command: str) -> str:
    """``command`` as the cloud runs a RUN step: ``bash -l -c``. A login shell resets PATH in
    /etc/profile; the cloud's python/node live on that default PATH, the emulator's template
    venv and npm prefix do not, so the build's PATH is carried over."""
    inner = shlex.quote(f'PATH="$KODE_BUILD_PATH"; {command}')
    return f'KODE_BUILD_PATH="$PATH" exec bash -l -c {inner}'
