import numpy as np
import pytest

import keras_t2t
from keras_t2t import imagenet


def test_preprocess_input_uses_the_official_mean_and_std():
    x = np.stack([np.zeros((2, 2, 3)), np.full((2, 2, 3), 255.0)]).astype("float32")
    out = keras_t2t.preprocess_input(x)
    np.testing.assert_allclose(
        out[0, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6
    )
    np.testing.assert_allclose(
        out[1, 0, 0], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-6
    )
    first = keras_t2t.preprocess_input(x.transpose(0, 3, 1, 2), data_format="channels_first")
    np.testing.assert_allclose(first.transpose(0, 2, 3, 1), out, rtol=1e-6)


def test_preprocess_input_tensor_in_tensor_out():
    import tensorflow as tf

    out = keras_t2t.preprocess_input(tf.fill((1, 2, 2, 3), 127.5))
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy()[0, 0, 0, 0], (0.5 - 0.485) / 0.229, rtol=1e-5)


def test_preprocess_input_errors():
    with pytest.raises(ValueError, match="3 channels"):
        keras_t2t.preprocess_input(np.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="data_format"):
        keras_t2t.preprocess_input(np.zeros((1, 4, 4, 3)), data_format="nhwc")


def test_decode_predictions(monkeypatch):
    index = {str(i): [f"n{i:08d}", f"class_{i}"] for i in range(1000)}
    monkeypatch.setattr(imagenet, "_CLASS_INDEX", index)  # where the class index is kept
    preds = np.zeros((2, 1000), "float32")
    preds[0, [7, 3]] = [0.9, 0.1]
    preds[1, 999] = 1.0
    decoded = keras_t2t.decode_predictions(preds, top=2)
    assert [d[1] for d in decoded[0]] == ["class_7", "class_3"]
    assert decoded[1][0][:2] == ("n00000999", "class_999")


def test_decode_predictions_errors():
    with pytest.raises(ValueError, match=r"shape \(batch, 1000\), received shape \(2, 10\)"):
        keras_t2t.decode_predictions(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="`top`"):
        keras_t2t.decode_predictions(np.zeros((1, 1000)), top=0)


def test_evaluation_constants_match_the_official_recipe():
    assert int(224 / imagenet.CROP_PCT) == 248
