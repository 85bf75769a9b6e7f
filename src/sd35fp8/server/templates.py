"""ComfyUI's template and model-browser routes: `/templates/{file}` from the `comfyui-workflow-templates`
package (when installed) so the web UI's template browser works, `/workflow_templates` (custom nodes'
example workflows: none here) and `/view_metadata/{folder}?filename=x.safetensors` (the file's
`__metadata__`, 404 when it has none, as ComfyUI).

ComfyUI serves the package's files: `index.json` (+ its translations) from the JSON bundle, each
template's `.json` and its thumbnails (`-1.webp`, ...) from the media bundles
(`comfyui_workflow_templates.iter_assets`). Without the package, `/templates/*` answers 404.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from sd35fp8.checkpoints.safetensors_file import read_header
from sd35fp8.errors import CheckpointError
from sd35fp8.workflow.folders import ModelFolders

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def template_files() -> dict[str, Path]:
    """file name -> path of every file the installed templates package serves ({} without it)."""
    try:
        import comfyui_workflow_templates as pkg
        import comfyui_workflow_templates_json as json_bundle
    except ImportError:
        return {}
    files = {p.name: p for p in (Path(json_bundle.__file__).parent / "templates").glob("index*.json")}
    missing = 0
    for entry in pkg.iter_templates():
        for asset in entry.assets:
            try:
                files.setdefault(asset.filename, Path(pkg.get_asset_path(entry.template_id, asset.filename)))
            except FileNotFoundError:  # its media bundle is not installed
                missing += 1
    if missing:
        log.info("templates: %d assets not served (their bundles are not installed)", missing)
    return files


def template_routes(folders: ModelFolders) -> APIRouter:
    r = APIRouter()

    @r.get("/view_metadata/{folder_name}")
    async def view_metadata(folder_name: str, filename: str = ""):
        if not filename.endswith(".safetensors") or folder_name not in folders.kinds:
            return Response(status_code=404)
        path = folders.get_full_path(folder_name, filename)
        if path is None:
            return Response(status_code=404)
        try:
            _tensors, metadata, _offset = read_header(path)
        except CheckpointError:
            return Response(status_code=404)
        return metadata if metadata else Response(status_code=404)

    @r.get("/templates/{filename:path}")
    async def template_file(filename: str):
        path = template_files().get(filename)
        if path is None or not path.is_file():
            return JSONResponse({"error": f"no template file {filename!r} (is comfyui-workflow-templates "
                                 "installed?)"}, status_code=404)
        return FileResponse(path)

    @r.get("/workflow_templates")
    async def workflow_templates() -> dict:
        return {}

    return r
