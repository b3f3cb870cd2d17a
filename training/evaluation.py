"""The evaluation of a model over a distributed validation set: top-1, top-5 and the mean
loss, counted exactly (the padding of the last batches is masked out). The trainer evaluates
with it after its epochs, and training/evaluate_imagenet.py with it alone.
"""

import logging

import keras
import numpy as np
import tensorflow as tf

from training.errors import TrainingError

logger = logging.getLogger("keras_t2t.training")


class EvaluationStopped(Exception):
    """An evaluation ended early by its `stop` callback (after SIGTERM)."""


def make_eval_step(model, strategy):
    """The evaluation step: one `tf.function`, traced once, for every evaluation of a run."""

    @tf.function
    def eval_step(images, labels, mask):
        def replica(images, labels, mask):
            logits = tf.cast(model(images, training=False), tf.float32)
            loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            top5 = tf.math.in_top_k(labels, logits, k=min(5, logits.shape[-1]))
            top1 = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
            return tf.stack(
                [
                    tf.reduce_sum(loss * mask),
                    tf.reduce_sum(tf.cast(top1, tf.float32) * mask),
                    tf.reduce_sum(tf.cast(top5, tf.float32) * mask),
                    tf.reduce_sum(mask),
                ]
            )

        sums = strategy.run(replica, args=(images, labels, mask))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return eval_step


def evaluate_model(model, dataset, strategy, step_fn=None, stop=None):
    """top1, top5, mean loss and count over a distributed `(images, labels, mask)` dataset.

    `step_fn`: from `make_eval_step` (made here when None). `stop`: called before each batch
    (on every worker alike); when it returns True, raises `EvaluationStopped` at once."""
    step_fn = step_fn or make_eval_step(model, strategy)
    totals = np.zeros(4)
    for images, labels, mask in dataset:  # data errors go to the caller, which names them
        if stop is not None and stop():
            raise EvaluationStopped()
        totals += np.asarray(step_fn(images, labels, mask))
    count = max(totals[3], 1.0)
    return dict(
        loss=totals[0] / count,
        top1=totals[1] / count,
        top5=totals[2] / count,
        examples=int(totals[3]),
    )


def check_count(evaluated, expected, skip_bad_records=False):
    """Refuses an evaluation that saw another number of examples than the validation set
    holds (a TrainingError), unless --skip_bad_records left some out (a warning)."""
    if evaluated == expected:
        return
    message = (
        f"The evaluation saw {evaluated:,} examples, but the validation set holds {expected:,}"
    )
    if skip_bad_records and evaluated < expected:
        logger.warning(
            "%s: --skip_bad_records left out the other %d.", message, expected - evaluated
        )
        return
    raise TrainingError(
        f"{message}: the accuracy would be over the wrong set. The validation files "
        f"changed during the run, or their record counts are wrong; check them (or "
        f"rebuild them with training/build_tfrecords.py) and run again. Checkpoints are kept."
    )
