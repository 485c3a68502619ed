"""The page's edge against a hostile client, over raw HTTP to a real `python -m ui` with a finished run.

Client file payloads (issue item 1): paths outside the roots, /dev/zero, FIFOs, dotfiles, links, a payload
without `meta`, all refused with one message and without blocking a handler slot, while a real photo is answered
within seconds. The file route (item 4): no dot-folders, nothing the page does not show or offer, never active
content inline. Host and Origin (item 7): DNS rebinding and other web pages are refused.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.imagegen import make_image
from tests.procs import SharedStack
from ui.guard import REFUSED

pytestmark = pytest.mark.timeout(300)

UPLOAD_MB = SharedStack.UPLOAD_MB
META = {"_type": "gradio.FileData"}


class Edge:
    """The session's page (tests/procs.py SharedStack: a finished run, a 1 MB upload cap) with traps planted in a
    data-root folder of this module's own, in an outside folder, in the models folder and in the run's folder."""

    def __init__(self, stack, outside: Path):
        self.page = stack.page
        self.models, self.data_root, self.outside = stack.models, stack.folder("edge"), outside
        self.classes = stack.CLASSES
        self.run_id = stack.run_id
        self.run_dir = stack.models / stack.run_id
        self.photo = stack.image("circle")
        self._plant()
        self.url = self.page.url
        self.port = int(self.url.rsplit(":", 1)[1])

    def _plant(self) -> None:
        def write(path: Path, text: str) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path

        # what the embedded Redis, the launcher and the image cache leave in the models folder
        self.dotfiles = [write(self.models / ".redis" / "appendonly.aof", "*3\r\n$3\r\nSET\r\n$6\r\nsecret\r\n"),
                         write(self.models / ".redis" / "redis.log", "Ready to accept connections"),
                         write(self.models / ".up.lock", "12345"),
                         write(self.models / ".cache" / "decoded.npy", "arrays")]
        self.cached_image = make_image(self.models / ".cache" / "thumb.png", 40)
        make_image(self.run_dir / "eval" / "confusion.png", 40)
        write(self.run_dir / "report.html", "<html><body>report</body></html>")
        self.scripts = [write(self.data_root / "evil.html", "<script>fetch('/gradio_api/upload')</script>"),
                        write(self.data_root / "shapes" / "evil.svg",
                              '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')]
        self.hidden_image = make_image(self.data_root / ".hidden" / "secret.png", 40)
        self.data_image = make_image(self.data_root / "loose.png", 40)
        self.secret = make_image(self.outside / "secret.png", 40)  # a real image, outside every root
        self.text = write(self.outside / "notes.txt", "not a picture\n")
        self.fifo_out = self.outside / "fifo.png"
        self.fifo_in = self.data_root / "fifo.png"
        for fifo in (self.fifo_out, self.fifo_in):
            os.mkfifo(fifo)
        os.symlink(self.secret, self.data_root / "link.png")  # a link in a root pointing out of it

    # --- raw HTTP ---------------------------------------------------------------------------------------------

    def call(self, api: str, data: list, headers: dict | None = None, timeout: float = 60) -> tuple[str, object]:
        """POST /gradio_api/call/<api>, then read its event stream: ("complete" | "error", data)."""
        posted = requests.post(f"{self.url}/gradio_api/call/{api}", json={"data": data}, headers=headers,
                               timeout=timeout)
        assert posted.status_code == 200, (posted.status_code, posted.text[:300])
        event_id = posted.json()["event_id"]
        with requests.get(f"{self.url}/gradio_api/call/{api}/{event_id}", stream=True, timeout=timeout) as stream:
            event = None
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event in ("complete", "error"):
                    return event, json.loads(line[len("data: "):])
        raise AssertionError(f"no answer from /{api}")

    def call_fn(self, fn_index: int, data: list, timeout: float = 60) -> dict:
        """A handler by fn_index, as the page's own frontend calls it (queue/join, then its event stream)."""
        session = uuid.uuid4().hex[:10]
        joined = requests.post(f"{self.url}/gradio_api/queue/join",
                               json={"data": data, "fn_index": fn_index, "session_hash": session,
                                     "event_data": None, "trigger_id": None}, timeout=timeout)
        assert joined.status_code == 200, (joined.status_code, joined.text[:300])
        with requests.get(f"{self.url}/gradio_api/queue/data", params={"session_hash": session}, stream=True,
                          timeout=timeout) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    message = json.loads(line[len("data: "):])
                    if message.get("msg") == "process_completed":
                        return message
        raise AssertionError(f"no answer from fn_index {fn_index}")

    def upload(self, name: str, content: bytes, headers: dict | None = None) -> requests.Response:
        return requests.post(f"{self.url}/gradio_api/upload", files={"files": (name, content)}, headers=headers,
                             timeout=30)

    def file(self, path: str | Path, headers: dict | None = None) -> requests.Response:
        return requests.get(f"{self.url}/gradio_api/file={path}", headers=headers, timeout=10)

    def predict_photo(self) -> dict:
        [uploaded] = self.upload("photo.jpg", self.photo.read_bytes()).json()
        kind, data = self.call("predict", [{"path": uploaded, "meta": META, "orig_name": "photo.jpg"}, self.run_id])
        assert kind == "complete", data
        return data[0]

    def fn_index(self, inputs: str, outputs: str) -> int:
        """The fn_index of the handler from the component `inputs` (elem_id) to `outputs` (elem_id)."""
        config = requests.get(f"{self.url}/config", timeout=10).json()
        ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
        for dep in config["dependencies"]:
            if ids[inputs] in dep["inputs"] and ids[outputs] in dep["outputs"]:
                return dep["id"]
        raise AssertionError(f"no handler from {inputs} to {outputs}")



@pytest.fixture(scope="module")
def edge(session_page, tmp_path_factory):
    return Edge(session_page, tmp_path_factory.mktemp("edge") / "outside")


def refused_message(data) -> str:
    return data.get("error") if isinstance(data, dict) else str(data)


# --- item 1: client file payloads --------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_opens_only_uploads_and_the_data_roots(edge):
    photo = edge.predict_photo()
    assert photo["label"] in edge.classes
    inside = edge.call("predict", [{"path": str(edge.data_image)}, edge.run_id])  # a data root: allowed
    assert inside[0] == "complete", inside
    probes = [
        {"path": str(edge.secret)},                               # a real image outside every root, no `meta`
        {"path": str(edge.secret), "meta": META},
        str(edge.secret),                                         # a bare path
        {"path": "/dev/zero"},                                    # size 0, endless
        {"path": str(edge.fifo_out)},                             # a FIFO outside
        {"path": str(edge.fifo_in)},                              # a FIFO inside a data root
        {"path": str(edge.text)},                                 # a text file outside (was "it contains text")
        {"path": str(edge.outside / "missing.png")},              # missing (was a different answer)
        {"path": str(edge.data_root / "link.png")},               # a link out of a root
        {"path": str(edge.hidden_image)},                         # a dot-folder inside a root
        {"path": str(edge.dotfiles[0]), "meta": META},            # the models folder (Gradio's static path)
        {"path": str(edge.run_dir / "best.pt"), "meta": META},
        {"path": f"{edge.data_root}/../outside/secret.png"},      # ../ out of a root
        {"path": "/etc/passwd"},
        {"path": ""},
        {"url": "http://127.0.0.1:1/secret.png"},
        ["not", "a", "file"],
    ]
    answers = []
    for probe in probes:
        started = time.monotonic()
        kind, data = edge.call("predict", [probe, edge.run_id])
        assert kind == "error", (probe, data)
        answers.append(refused_message(data))
        assert time.monotonic() - started < 20, probe
    # one answer for missing and not allowed, whatever the reason: ours, or Gradio's own refusal (no message) for
    # a `meta` payload outside its upload folder or a payload that is not a file at all
    assert set(answers) <= {REFUSED, None}, answers
    reaching_the_handler = [a for p, a in zip(probes, answers) if isinstance(p, dict) and "meta" not in p]
    assert set(reaching_the_handler) == {REFUSED}, answers
    # "Classify all": Gradio lets a `meta` payload in the models folder through (a static path); the guard does not
    [uploaded] = edge.upload("photo.jpg", edge.photo.read_bytes()).json()
    kind, data = edge.call("predict_many", [[{"path": str(edge.cached_image), "meta": META},
                                             {"path": uploaded, "meta": META}], edge.run_id])
    assert kind == "complete", data
    rows = data[0]["data"]
    assert rows[0][-1] == REFUSED and rows[1][1] in edge.classes, rows
    assert edge.page.alive()


@pytest.mark.slow
def test_data_urls_are_capped(edge):
    small = base64.b64encode(edge.photo.read_bytes()).decode()
    kind, data = edge.call("predict", [{"url": f"data:image/jpeg;base64,{small}", "path": None}, edge.run_id])
    assert kind == "complete", data
    big = base64.b64encode(os.urandom(UPLOAD_MB * 1024 * 1024 + 1000)).decode()
    kind, data = edge.call("predict", [{"url": f"data:image/jpeg;base64,{big}", "path": None}, edge.run_id])
    assert kind == "error" and f"larger than {UPLOAD_MB} MB" in refused_message(data), data


@pytest.mark.slow
def test_layer_activations_open_only_uploads_and_the_data_roots(edge):
    fn = edge.fn_index("act-image", "activations")
    for probe in ({"path": str(edge.secret)}, {"path": "/dev/zero"}, {"path": str(edge.fifo_out)},
                  {"path": str(edge.outside / "missing.png")}):
        message = edge.call_fn(fn, [edge.run_id, probe])
        assert message["success"] is False, (probe, message)
        assert message["output"].get("error") == REFUSED, (probe, message["output"])
    [uploaded] = edge.upload("photo.jpg", edge.photo.read_bytes()).json()
    message = edge.call_fn(fn, [edge.run_id, {"path": uploaded, "meta": META}])
    assert message["success"] is True, message
    assert edge.page.alive()


@pytest.mark.slow
def test_fifos_and_devices_never_hold_a_handler_while_a_photo_waits(edge):
    stuck: list[tuple[str, object]] = []
    probes = [{"path": str(edge.fifo_out)}, {"path": str(edge.fifo_in)}, {"path": "/dev/zero"},
              {"path": "/dev/zero"}, {"path": str(edge.fifo_out)}, {"path": str(edge.fifo_in)}]
    threads = [threading.Thread(target=lambda p=p: stuck.append(edge.call("predict", [p, edge.run_id])))
               for p in probes]
    for t in threads:
        t.start()
    started = time.monotonic()
    assert edge.predict_photo()["label"] in edge.classes
    assert time.monotonic() - started < 30, "a real photo waited behind the FIFO and /dev/zero calls"
    for t in threads:
        t.join(timeout=60)
    assert [kind for kind, _ in stuck] == ["error"] * len(probes), stuck
    assert edge.page.alive()


# --- item 4: the file route --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_file_route_serves_only_what_the_page_shows_or_offers(edge):
    refused = [*edge.dotfiles, edge.cached_image, *edge.scripts, edge.hidden_image, edge.fifo_in,
               edge.data_root / "link.png", edge.run_dir / "config.json", edge.run_dir / "last.pt", edge.run_dir / "status.json",
               edge.run_dir / "metrics.jsonl", f"{edge.run_dir}/eval/../../.redis/appendonly.aof", "/dev/zero",
               edge.secret, edge.outside / "missing.png"]
    for path in refused:
        response = edge.file(path)
        assert response.status_code == 403, (path, response.status_code, response.text[:200])
        assert b"secret" not in response.content and b"<script" not in response.content, path
    # what the page shows: figures and data-root images inline, never sniffed
    for path, media in ((edge.run_dir / "eval" / "confusion.png", "image/png"), (edge.data_image, "image/png")):
        response = edge.file(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media and response.headers["x-content-type-options"] == "nosniff"
    # what it offers for download: attachments only
    for name in ("best.pt", "report.html"):
        response = edge.file(edge.run_dir / name)
        assert response.status_code == 200, name
        assert response.headers["content-disposition"].startswith("attachment"), response.headers
        assert response.headers["content-type"] == "application/octet-stream"
    # an uploaded .html goes back as a download, never as a page of this origin
    [uploaded] = edge.upload("evil.html", b"<script>alert(1)</script>").json()
    response = edge.file(uploaded)
    assert response.status_code == 200 and response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"


# --- item 7: hosts and origins -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_foreign_hosts_and_origins_are_refused(edge):
    for host in ("evil.example", f"evil.example:{edge.port}", f"127.0.0.1.evil.example:{edge.port}"):
        response = requests.get(f"{edge.url}/gradio_api/info", headers={"Host": host}, timeout=10)
        assert response.status_code == 400, host  # DNS rebinding: another site's name for this address
    for host in ("localhost", "127.0.0.1"):
        response = requests.get(f"{edge.url}/gradio_api/info", headers={"Host": f"{host}:{edge.port}"}, timeout=10)
        assert response.status_code == 200, host
    image = edge.photo.read_bytes()
    # another web page (a site, another port on this machine, a sandboxed frame) may not post or read
    for origin in ("http://evil.example", "http://localhost:9", f"http://127.0.0.1:{edge.port + 1}", "null"):
        headers = {"Origin": origin}
        assert edge.upload("photo.jpg", image, headers=headers).status_code == 403, origin
        posted = requests.post(f"{edge.url}/gradio_api/call/predict", headers=headers, timeout=10,
                               json={"data": [{"path": str(edge.data_image)}, edge.run_id]})
        assert posted.status_code == 403, origin
        assert requests.get(f"{edge.url}/gradio_api/info", headers=headers, timeout=10).status_code == 403, origin
    # the page itself still works, from both of its loopback names
    for origin in (edge.url, f"http://localhost:{edge.port}"):
        host = origin.split("//", 1)[1]
        response = edge.upload("photo.jpg", image, headers={"Origin": origin, "Host": host})
        assert response.status_code == 200, (origin, response.text[:200])
    assert edge.page.alive()


# --- the guards on their own (no page) ---------------------------------------------------------------------------

def test_the_allow_list_needs_a_login_and_widens_hosts_only_with_one():
    from ui.__main__ import check_bind
    from ui.guard import trusted_hosts

    with pytest.raises(SystemExit, match="ALLOWED_HOSTS needs RESNET_LAB_AUTH"):
        check_bind(_settings(allowed_hosts=("lab.example.com",)))
    with pytest.raises(SystemExit, match="not a host name"):
        check_bind(_settings(auth="me:secret", allowed_hosts=("lab.*.com",)))
    assert trusted_hosts(_settings()) == ["localhost", "127.0.0.1", "[::1]"]
    assert trusted_hosts(_settings(auth="me:secret")) == ["*"]  # the login is the defence
    assert trusted_hosts(_settings(auth="me:secret", host="0.0.0.0", allowed_hosts=("lab.example.com",))) == [
        "localhost", "127.0.0.1", "[::1]", "lab.example.com"]


def test_origin_and_host_checks_behind_a_proxy_with_an_allow_list():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ui.guard import origin_middleware

    settings = _settings(auth="me:secret", allowed_hosts=("lab.example.com",))
    app = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"), methods=["GET", "POST"])],
                    middleware=origin_middleware(settings))
    client = TestClient(app, base_url="http://lab.example.com")
    assert client.post("/x", headers={"Origin": "https://lab.example.com"}).status_code == 200  # TLS proxy
    assert client.post("/x", headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.get("/x", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/x", headers={"Host": "127.0.0.1:7860"}).status_code == 200


def _settings(**changes):
    from shared.settings import Settings

    return Settings(**changes)


def test_client_files_read_at_most_the_cap(tmp_path):
    from ui.guard import ClientFiles, FileRefused, UploadError

    files = ClientFiles(tmp_path / "uploads", (tmp_path / "data",), max_bytes=1000)
    (tmp_path / "uploads").mkdir()
    ok = tmp_path / "uploads" / "a.jpg"
    ok.write_bytes(b"x" * 1000)
    assert files.read({"path": str(ok), "orig_name": "mine.jpg"}) == (b"x" * 1000, "mine.jpg")
    ok.write_bytes(b"x" * 1001)
    with pytest.raises(UploadError, match="larger than"):
        files.read(str(ok))
    with pytest.raises(UploadError, match="larger than"):
        files.read({"url": "data:image/png;base64," + base64.b64encode(b"y" * 2000).decode()})
    for bad in ("/dev/zero", str(tmp_path / "elsewhere.jpg"), None, 3, {"path": None}):
        with pytest.raises(FileRefused):
            files.read(bad)
