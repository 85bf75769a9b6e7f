"""/templates/* from the installed comfyui-workflow-templates package (the web UI's template browser)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sd35fp8.server import create_app, stop_app

pytest.importorskip("comfyui_workflow_templates")


def test_templates_served(tmp_path):
    (tmp_path / "models").mkdir()
    app = create_app(tmp_path / "models", output_dir=tmp_path / "out", device="cpu", serve_frontend=False,
                     allow_hosts=("testserver",))  # TestClient's Host
    try:
        with TestClient(app) as client:
            index = client.get("/templates/index.json")
            assert index.status_code == 200 and isinstance(index.json(), list)
            wf = client.get("/templates/sd3.5_simple_example.json")
            assert wf.status_code == 200 and "nodes" in wf.json()
            assert client.get("/templates/sd3.5_simple_example-1.webp").status_code == 200
            assert client.get("/templates/nope.json").status_code == 404
            assert client.get("/workflow_templates").json() == {}
            assert client.get("/api/workflow_templates").json() == {}
    finally:
        stop_app(app)


def test_view_metadata(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "models" / "loras").mkdir(parents=True)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "models" / "loras" / "m.safetensors"), metadata={"ss_x": "1"})
    save_file({"a": torch.zeros(1)}, str(tmp_path / "models" / "loras" / "bare.safetensors"))
    app = create_app(tmp_path / "models", output_dir=tmp_path / "out", device="cpu", serve_frontend=False,
                     allow_hosts=("testserver",))  # TestClient's Host
    try:
        with TestClient(app) as client:
            assert client.get("/view_metadata/loras", params={"filename": "m.safetensors"}).json() == {"ss_x": "1"}
            assert client.get("/view_metadata/loras", params={"filename": "bare.safetensors"}).status_code == 404
            assert client.get("/view_metadata/loras", params={"filename": "nope.safetensors"}).status_code == 404
            assert client.get("/view_metadata/bogus", params={"filename": "m.safetensors"}).status_code == 404
    finally:
        stop_app(app)
