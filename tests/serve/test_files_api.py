"""The Files API of `tokenmill serve` (the Batch API's first part) with the real `openai` client: upload, list with
pagination, retrieve, content, delete, in the API's shapes; files survive a SIGKILL of the server; an upload that
breaks off mid-body registers nothing and leaves no bytes behind; bad uploads are 400s, unknown ids 404s."""

from __future__ import annotations

import json
import socket

import pytest

from test_server import KEY, Server, request


@pytest.fixture()
def state_dir(tmp_path):
    return tmp_path / "state"


def test_upload_list_retrieve_download_delete_and_survive_a_kill(cli_env, smollm2, state_dir):
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": f"Count to {i}", "max_tokens": 3}}) for i in range(5)]
    data = ("\n".join(lines) + "\n").encode()
    s = Server(cli_env, "--api-key", KEY, "--state-dir", state_dir, "--max-model-len", 256)
    try:
        c = s.client()
        ids = []
        for i in range(3):
            f = c.files.create(file=(f"in{i}.jsonl", data), purpose="batch")
            assert f.object == "file" and f.bytes == len(data) and f.filename == f"in{i}.jsonl"
            assert f.purpose == "batch" and f.status == "processed"
            ids.append(f.id)
        assert c.files.retrieve(ids[1]).id == ids[1]
        assert c.files.content(ids[2]).read() == data
        page = c.files.list(limit=2)  # newest first
        assert [f.id for f in page.data] == [ids[2], ids[1]] and page.has_more
        assert [f.id for f in c.files.list(limit=2, after=ids[1]).data] == [ids[0]]
        assert [f.id for f in c.files.list(order="asc")] == ids  # the SDK pages through every file
        assert c.files.delete(ids[0]).deleted
        status, _, payload = request(s.port, "GET", f"/v1/files/{ids[0]}")
        assert status == 404 and ids[0] in json.loads(payload)["error"]["message"]
        assert not (state_dir / "files" / ids[0]).exists()
        status, _, payload = request(s.port, "POST", "/v1/files", raw=b"not multipart")
        assert status == 400 and "multipart/form-data" in json.loads(payload)["error"]["message"]
        import openai

        with pytest.raises(openai.BadRequestError, match="purpose must be one of batch"):
            c.files.create(file=("x.jsonl", data), purpose="fine-tune")
        # an upload that breaks off: headers promise more bytes than are sent, then the connection closes
        boundary = "tmboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.jsonl\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data * 50
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
            sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                         f"Content-Length: {len(head) * 4}\r\n\r\n".encode() + head)
        assert {f.id for f in c.files.list()} == set(ids[1:])
        s.proc.kill()  # SIGKILL: no shutdown of any kind
        s.proc.wait(timeout=60)
        assert sorted(p.name for p in (state_dir / "files").iterdir()) == sorted(ids[1:])
    finally:
        s.stop()
    s = Server(cli_env, "--api-key", KEY, "--state-dir", state_dir, "--max-model-len", 256)
    try:
        c = s.client()
        assert [f.id for f in c.files.list(order="asc")] == ids[1:]
        assert c.files.content(ids[1]).read() == data
    finally:
        s.stop()
