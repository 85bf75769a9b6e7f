"""ComfyUI's list execution (execution.py _map_node_over_list / merge_result_data) in the executor: a node after a
list output runs once per item (shorter lists repeat their last item), OUTPUT_IS_LIST slots join the runs' lists,
INPUT_IS_LIST nodes get whole lists, UI results are joined; checked with the Rebatch nodes and toy node classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.lists import NodeList, call_mapped
from sd35fp8.workflow.node_base import Node


def test_rebatch_then_per_item_nodes(tmp_path):
    """EmptyImage x5 -> RebatchImages(2) gives batches of 2, 2, 1; ImageInvert and SaveImage run once per batch, and
    SaveImage's UI lists every image, as ComfyUI."""
    (tmp_path / "models").mkdir()
    ex = PromptExecutor(ModelFolders(tmp_path), device="cpu", dtype=torch.float32)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 5, "color": 0x102030}},
        "2": {"class_type": "RebatchImages", "inputs": {"images": ["1", 0], "batch_size": 2}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "r"}},
    }
    result = ex.execute(prompt, "p1")
    assert result.success, result.error
    saved = result.outputs["4"]["images"]
    assert len(saved) == 5
    arrays = [np.asarray(Image.open(ex.folders.output_dir / s["subfolder"] / s["filename"])) for s in saved]
    want = 255 - np.array([0x10, 0x20, 0x30])
    for a in arrays:
        assert np.abs(a.reshape(-1, 3) - want).max() <= 1


class Split(Node):
    RETURN_TYPES = ("INT", "INT")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"n": ("INT",)}}

    def run(self, n):
        return {"ui": {"seen": [n]}, "result": (list(range(n)), n)}


class Add(Node):
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, a, b):
        return (a + b,)


class Total(Node):
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "run"

    def run(self, values, scale):
        return (sum(values) * scale[0],)


def test_mapping_rules():
    outs, ui = call_mapped(Split(None).run, {"n": NodeList([2, 3])}, Split, "Split")
    assert outs == ([0, 1, 0, 1, 2], [2, 3]) and isinstance(outs[0], NodeList)
    assert ui == {"seen": [2, 3]}
    # per item, the shorter list repeating its last item; a lone value for every run
    outs, _ = call_mapped(Add(None).run, {"a": NodeList([1, 2, 3]), "b": NodeList([10, 20])}, Add, "Add")
    assert outs == ([11, 22, 23],)
    outs, _ = call_mapped(Add(None).run, {"a": NodeList([1, 2]), "b": 5}, Add, "Add")
    assert outs == ([6, 7],)
    # one value: no list at all (a one-item list is the value)
    outs, _ = call_mapped(Add(None).run, {"a": 1, "b": 2}, Add, "Add")
    assert outs == (3,) and not isinstance(outs[0], list)
    outs, _ = call_mapped(Split(None).run, {"n": 1}, Split, "Split")
    assert outs == (0, 1) and not isinstance(outs[0], list)
    # INPUT_IS_LIST: whole lists, lone values as lists of one, one run
    outs, _ = call_mapped(Total(None).run, {"values": NodeList([1, 2, 3]), "scale": 2}, Total, "Total")
    assert outs == (12,)
    with pytest.raises(InputError, match="empty list"):
        call_mapped(Add(None).run, {"a": NodeList([]), "b": 1}, Add, "Add")
    # a CONDITIONING-like plain list is one value, not a list of values
    outs, _ = call_mapped(Add(None).run, {"a": [1], "b": [2]}, Add, "Add")
    assert outs == ([1, 2],) and not isinstance(outs[0], NodeList)


def test_load_image_output_lists_and_loads_outputs(tmp_path):
    """LoadImageOutput: the output folder's images, newest first, as 'name [output]'; a listed name loads."""
    from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS
    from sd35fp8.workflow.node_base import NodeContext

    (tmp_path / "models").mkdir()  # the output folder beside it, this test's own
    folders = ModelFolders(tmp_path)
    (folders.output_dir / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 3), (10, 20, 30)).save(folders.output_dir / "sub" / "a.png")
    names = NODE_CLASS_MAPPINGS["LoadImageOutput"].INPUT_TYPES(folders)["required"]["image"][0]
    assert names == ["sub/a.png [output]"]
    assert NODE_CLASS_MAPPINGS["LoadImageOutput"].VALIDATE_INPUTS(folders, names[0]) is True
    image, mask = NODE_CLASS_MAPPINGS["LoadImageOutput"](NodeContext(folders=folders)).load_image(names[0])
    assert image.shape == (1, 3, 4, 3) and abs(float(image[0, 0, 0, 0]) - 10 / 255) < 1e-6
