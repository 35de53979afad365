"""`offload serve` safe by default: local binding said at start, the API key, a clean stop, the missing extra."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.errors import OffloadError
from offload.serve.schema import RequestError, chat_request, parse_json
from tests.serve_helpers import ROOT, LiveServer

KEY = "s3cret-key"


def test_the_engine_imports_without_the_serve_extra() -> None:
    # A module set to None in sys.modules fails to import, as when the package is not installed.
    code = (
        "import sys\n"
        "for name in ('starlette', 'uvicorn', 'sse_starlette', 'fastapi'): sys.modules[name] = None\n"
        "import offload.engine, offload.chat, offload.serve, offload.serve.schema, cli.main\n"
        "print('imported')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}
    )
    assert out.stdout.strip() == "imported", out.stderr


def test_a_missing_extra_is_a_one_line_hint(tmp_path: Path) -> None:
    code = "import sys; sys.modules['uvicorn'] = None; import cli.main; sys.argv = ['offload', 'serve']; cli.main.run()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: offload serve needs the 'serve' extra (uvicorn missing): pip install 'offload[serve]'"
    ]


def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


def test_request_bodies_become_checked_requests() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
        "max_completion_tokens": 16.0,
        "stop": "END",
    }
    request = chat_request(parse_json(json.dumps(body).encode()))
    assert request.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    )
    assert request.sampling.max_tokens == 16 and request.sampling.stop == ("END",)
    with pytest.raises(RequestError, match="only text is supported"):
        chat_request({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(RequestError, match="'tools' is not supported"):
        chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})
    assert issubclass(RequestError, OffloadError)


def test_the_served_model_id_is_the_repo_id_as_given_or_the_directory_name(tmp_path: Path) -> None:
    from cli.serve_cmd import served_name

    directory = tmp_path / "Mixtral-8x7B-Instruct-v0.1"
    directory.mkdir()
    snapshot = tmp_path / "models--mistralai--Mixtral-8x7B-Instruct-v0.1" / "snapshots" / "0123abcd"
    assert (
        served_name("mistralai/Mixtral-8x7B-Instruct-v0.1", snapshot)
        == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    )
    assert served_name(str(directory), directory) == served_name(None, directory) == directory.name


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("serve-key"), env={"OFFLOAD_API_KEY": KEY})
    yield live
    live.stop()


def test_start_line_says_it_is_local_only(keyed: LiveServer) -> None:
    assert f"at http://127.0.0.1:{keyed.port}/ (only this machine can connect" in keyed.stdout()


def test_every_endpoint_but_health_and_the_page_needs_the_key(keyed: LiveServer) -> None:
    httpx = pytest.importorskip("httpx")
    assert httpx.get(keyed.url + "/health", timeout=30).status_code == 200
    assert httpx.get(keyed.url + "/", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        refused = httpx.get(keyed.url + "/v1/models", headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        refused = httpx.post(keyed.url + "/v1/chat/completions", json={}, headers=headers, timeout=30)
        assert refused.status_code == 401
    for scheme in ("bearer", "BEARER", "Bearer"):  # the scheme's case does not matter (RFC 9110)
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert httpx.get(keyed.url + "/v1/models", headers=headers, timeout=30).status_code == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["demo"]


def test_sigterm_ends_the_stream_in_flight_and_exits_cleanly(keyed: LiveServer) -> None:
    httpx = pytest.importorskip("httpx")
    body = {"prompt": "def main(", "temperature": 0, "max_tokens": 4000, "stream": True}  # loops until 4,000
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", keyed.url + "/v1/completions", json=body, headers=headers, timeout=300
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        keyed.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(rest[-2].removeprefix("data: "))["error"]["message"]
    assert keyed.stop() == 0
    assert "Traceback" not in keyed.stderr() and "stopped" in keyed.stderr()
