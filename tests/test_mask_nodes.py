"""ComfyUI's mask and composite nodes (workflow/nodes_mask.py) against its formulas written out here (scipy's
grey dilation / erosion for GrowMask, as ComfyUI calls it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS as NODES

CTX = NodeContext(folders=None)


def run(name, **kw):
    cls = NODES[name]
    return getattr(cls(CTX), cls.FUNCTION)(**kw)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_registered():
    for name in ("LatentCompositeMasked", "ImageCompositeMasked", "MaskToImage", "ImageToMask", "SolidMask",
                 "InvertMask", "CropMask", "MaskComposite", "FeatherMask", "GrowMask", "ThresholdMask"):
        assert NODES[name].PYTHON_MODULE == "comfy_extras.nodes_mask"


@pytest.mark.parametrize("expand,tapered", [(3, True), (3, False), (-2, True), (-2, False), (0, True)])
def test_grow_mask_is_scipy_grey_morphology(expand, tapered):
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = (rand(2, 17, 13) > 0.8).float() * rand(2, 17, 13, seed=1)
    (got,) = run("GrowMask", mask=mask, expand=expand, tapered_corners=tapered)
    c = 0 if tapered else 1
    kernel = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    for m, g in zip(mask, got):
        ref = m.numpy()
        for _ in range(abs(expand)):
            ref = (ndimage.grey_erosion if expand < 0 else ndimage.grey_dilation)(ref, footprint=kernel)
        np.testing.assert_array_equal(g.numpy(), ref)


def test_feather_mask_matches_comfyuis_loops():
    mask = rand(1, 12, 10)
    (got,) = run("FeatherMask", mask=mask, left=3, top=2, right=4, bottom=5)
    ref = mask.clone()
    for x in range(3):
        ref[:, :, x] *= (x + 1.0) / 3
    for x in range(4):
        ref[:, :, -x] *= (x + 1) / 4
    for y in range(2):
        ref[:, y, :] *= (y + 1) / 2
    for y in range(5):
        ref[:, -y, :] *= (y + 1) / 5
    torch.testing.assert_close(got, ref)


def test_composites_and_simple_masks():
    dest, src = rand(1, 20, 24, 3), rand(1, 8, 10, 3, seed=1)
    (out,) = run("ImageCompositeMasked", destination=dest, source=src, x=5, y=4, resize_source=False)
    ref = dest.clone()
    ref[:, 4:12, 5:15] = src
    torch.testing.assert_close(out, ref)
    mask = torch.zeros(8, 10)
    mask[:, :5] = 1.0
    (out,) = run("ImageCompositeMasked", destination=dest, source=src, x=20, y=16, resize_source=False, mask=mask)
    ref = dest.clone()
    ref[:, 16:20, 20:24] = src[:, :4, :4]  # clipped to the destination; the mask's left half
    torch.testing.assert_close(out, ref)
    lat_d, lat_s = {"samples": rand(1, 16, 8, 8)}, {"samples": rand(1, 16, 4, 4, seed=2)}
    (lat,) = run("LatentCompositeMasked", destination=lat_d, source=lat_s, x=16, y=8, resize_source=False)
    ref = lat_d["samples"].clone()
    ref[:, :, 1:5, 2:6] = lat_s["samples"]
    torch.testing.assert_close(lat["samples"], ref)
    m = rand(2, 6, 7)
    assert run("MaskToImage", mask=m)[0].shape == (2, 6, 7, 3)
    torch.testing.assert_close(run("ImageToMask", image=dest, channel="green")[0], dest[..., 1])
    torch.testing.assert_close(run("InvertMask", mask=m)[0], 1.0 - m)
    torch.testing.assert_close(run("ThresholdMask", mask=m, value=0.5)[0], (m > 0.5).float())
    assert run("SolidMask", value=0.25, width=5, height=3)[0].shape == (1, 3, 5)
    assert run("CropMask", mask=m, x=2, y=1, width=3, height=4)[0].shape == (2, 4, 3)
    a, b = (m > 0.5).float(), (rand(2, 3, 3, seed=3) > 0.5).float()
    (xor,) = run("MaskComposite", destination=a, source=b, x=1, y=2, operation="xor")
    ref = a.clone()
    ref[:, 2:5, 1:4] = torch.logical_xor(a[:, 2:5, 1:4].bool(), b).float()
    torch.testing.assert_close(xor, ref)
    (add,) = run("MaskComposite", destination=m, source=m, x=0, y=0, operation="add")
    torch.testing.assert_close(add, (m + m).clamp(0, 1))
