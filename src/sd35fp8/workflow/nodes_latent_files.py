"""ComfyUI's SaveLatent / LoadLatent (nodes.py): a LATENT written to output/ as a `.latent` safetensors file
(latent_tensor + latent_format_version_0, the prompt and workflow in its metadata) and read back from input/
(files older than latent_format_version_0 are rescaled by 1 / 0.18215, as ComfyUI does)."""

from __future__ import annotations

from sd35fp8.errors import InputError
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import Node


class SaveLatent(Node):
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "filename_prefix": ("STRING", {"default": "latents/ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, samples, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        saved = engine.save_latent(samples["samples"], self.ctx.folders.output_dir, filename_prefix, prompt,
                                   extra_pnginfo)
        return {"ui": {"latents": [saved]}}


class LoadLatent(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"latent": (folders.input_latents() if folders is not None else [],)}}

    @classmethod
    def VALIDATE_INPUTS(cls, folders, latent):
        """Any existing file ('x.latent [output]' included), as LoadImage."""
        try:
            return True if cls._path(folders, latent).is_file() else f"Invalid latent file: {latent}"
        except InputError:  # a name that leaves its folder
            return f"Invalid latent file: {latent}"

    @classmethod
    def IS_CHANGED(cls, folders, latent=None, **_):
        path = cls._path(folders, latent)
        if not path.is_file():
            raise InputError(f"latent file {latent!r} not found ({path})")
        return engine.file_sha256(path)

    @staticmethod
    def _path(folders, latent):
        return folders.annotated_path(latent, what="latent")

    def load(self, latent):
        path = self._path(self.ctx.folders, latent)
        if not path.is_file():
            raise InputError(f"latent file {latent!r} not found ({path})")
        return (engine.load_latent(path),)


LATENT_FILE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (SaveLatent, LoadLatent)}
