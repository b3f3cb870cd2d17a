"""The ImageNet training of keras-t2t: a `tf.distribute` program (TensorFlow backend)."""

from keras_t2t import require_tensorflow_backend

require_tensorflow_backend("training/ (the tf.distribute ImageNet training)")
