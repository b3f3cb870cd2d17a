import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "MANIFEST.json").read_text())
TINY_ARCH = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(params=sorted(GOLDEN))
def golden(request):
    """One golden model: its manifest entry, checkpoint path, NHWC images and logits."""
    entry = GOLDEN[request.param]
    io = np.load(DATA / entry["io"])
    return dict(
        entry,
        name=request.param,
        checkpoint=str(DATA / entry["checkpoint"]),
        images=io["images_nchw"].transpose(0, 2, 3, 1),
        images_nchw=io["images_nchw"],
        logits=io["logits"],
    )


def tiny_model(tokens_type="performer", **kwargs):
    """The golden models' architecture (embed 64, depth 2, 2 heads), 64x64 by default."""
    import keras_t2t

    kwargs.setdefault("input_shape", (64, 64, 3))
    kwargs.setdefault("classes", 10)
    return keras_t2t.T2TViT(tokens_type=tokens_type, **TINY_ARCH, **kwargs)
