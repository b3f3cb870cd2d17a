"""The T2T-ViT training loop: `Trainer`, one custom loop for every `tf.distribute` strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy, and `steps_per_execution > 1`
fails under MirroredStrategy, so this loop drives `strategy.run` itself, several steps per
`tf.function` call (as a TPU wants), with the forward and backward pass compiled by XLA.

The rest of a run has a module each, beside this one:
- `config`: `Config`, the recipes, `resolve` (every flag checked);
- `distribute`: the strategy, the chief, the workers;
- `optim`: AdamW, loss scaling, the schedule, the EMA;
- `checkpoints`: restore (with retries), verify, set aside, the run directory's files;
- `evaluation`: the evaluation step, `evaluate_model`;
- `errors`: `TrainingError`, `Preempted`, the messages of data and disk errors.

Sections: data and the model -> the Trainer (set-up -> checkpoints and the record -> steps ->
data -> evaluation -> the loop -> logs and weights) -> helpers.
"""

import json
import logging
import math
import os
import signal
import time

import keras
import tensorflow as tf

import keras_t2t
from keras_t2t import weights as weights_lib
from training import checkpoints, distribute, evaluation, optim
from training import data as data_lib
from training.config import checkpoint_interval, resolve
from training.errors import (
    DATA_ERRORS,
    Preempted,
    TrainingError,
    first_line,
    input_pipeline_error,
    is_data_error,
)

logger = logging.getLogger("keras_t2t.training")

RUN_WEIGHTS = weights_lib.RUN_WEIGHTS  # the weights a run leaves in its model_dir
RECORD_KEY = weights_lib.RUN_RECORD_KEY  # config.json's record of them


# --- data and the model ---------------------------------------------------------------------


def data_sources(config, split, cache=None):
    """(source, examples, `{shard: records}` or None) of `split`, checked before training.

    TFRecords are checked by `data.check_shards` (the manifest of build_tfrecords.py, or
    every record header; `cache` keeps the counts between restarts); TFDS needs no check.
    """
    if config.data_source == "tfds":
        # Opened by each input pipeline (host) in its dataset_fn, which reads its own files.
        source = data_lib.TFDSSource(split, config.data_dir)
        return source, source.num_examples, None
    files = data_lib.list_files(config.data_dir, split)
    counts = data_lib.check_shards(
        files, split, config.num_classes, config.skip_bad_records, cache=cache
    )
    return files, sum(counts.values()), counts


def build_model(config):
    """The model of a run: `config.model` with its head for `config.num_classes`, logits out,
    stochastic depth and `config.gradient_checkpointing`; from `config.weights` when given."""
    return keras_t2t.create_model(
        config.model,
        input_shape=(config.image_size, config.image_size, 3),
        classes=config.num_classes,
        classifier_activation=None,
        drop_path_rate=config.drop_path_rate,
        weights=config.weights,
        gradient_checkpointing=config.gradient_checkpointing,
    )


# --- the Trainer ----------------------------------------------------------------------------


class Trainer:
    """One run of `config`: training, evaluation or both (`--mode`), in `config.model_dir`.

    `Trainer(config)` resolves and checks the config, makes the strategy, checks the data
    (`data.check_shards`), refuses a model_dir that holds another model's or recipe's
    checkpoints, and builds the model, the optimizer, the EMA and their checkpoint. `run()`
    then trains (`train`) and/or evaluates, writes the raw and EMA weights, config.json and
    eval_results.json, and returns the evaluation results.

    `train` resumes from the newest readable checkpoint, runs `--steps_per_loop` steps per
    call, saves at the end of every epoch and every `--checkpoint_every`, and evaluates the
    raw and EMA weights every `--eval_every_epochs` (exporting both after each evaluation).
    A SIGTERM saves a checkpoint, then raises `Preempted`; what the user can fix raises
    `TrainingError`. Every worker of a multi-worker run makes its own Trainer and calls the
    same methods: the chief writes the checkpoints and the files; the others restore the
    chief's checkpoints.
    """

    # --- set-up ---------------------------------------------------------------------------

    def __init__(self, config):
        self.config = config = resolve(config)
        self.strategy = distribute.make_strategy(config)
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise TrainingError(
                f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas; "
                f"use a multiple of {replicas}."
            )
        self.eval_batch_size = config.eval_batch_size or config.batch_size
        if self.eval_batch_size % replicas:
            raise TrainingError(
                f"--eval_batch_size={self.eval_batch_size} is not divisible by the "
                f"{replicas} replicas."
            )
        _check_tensorboard()
        distribute.check_pod_paths(config, self.strategy)
        self.chief = distribute.is_chief(self.strategy)
        self.dir = distribute.worker_dir(config.model_dir, self.strategy)
        try:
            tf.io.gfile.makedirs(self.dir)
        except tf.errors.OpError as error:
            raise TrainingError(
                f"Cannot create --model_dir {config.model_dir!r}: {first_line(error)}"
            ) from None
        # Every worker restores from the chief's checkpoints (see `restore` and `save`).
        checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
        # Before anything is written: a model_dir of another model or recipe is refused, its
        # record kept. The record is rewritten once a checkpoint is restored (`_resume`).
        self._previous = checkpoints.check_compatible(config, checkpoint_dir)
        self._origin = config.weights  # what the run started from: kept when it resumes

        keras.utils.set_random_seed(config.seed)  # the same initial weights on every worker
        keras.mixed_precision.set_global_policy(
            "float32" if config.mixed_precision == "float32" else f"mixed_{config.mixed_precision}"
        )
        self.train_source = self.eval_source = None
        self.shards = {}  # split -> {shard: records}, for naming a bad record

        def sources(split):
            cache = os.path.join(self.dir, f"data_check-{split}.json") if self.chief else None
            source, examples, self.shards[split] = data_sources(config, split, cache)
            return source, examples

        if config.mode != "eval":
            self.train_source, train_examples = sources("train")
            train_examples = config.train_examples or train_examples
            self.steps_per_epoch = config.steps_per_epoch or train_examples // config.batch_size
            if self.steps_per_epoch < 1:
                raise TrainingError(
                    f"{train_examples} training examples make no full batch of "
                    f"{config.batch_size}; "
                    f"lower --batch_size."
                )
        else:
            self.steps_per_epoch = config.steps_per_epoch or 1
        if config.mode != "train":
            self.eval_source, self.eval_examples = sources("validation")
        self.total_steps = config.epochs * self.steps_per_epoch

        with self.strategy.scope():
            self.model = build_model(config)
            self.optimizer, self.schedule = optim.build_optimizer(
                config, self.steps_per_epoch, self.model
            )
            self.ema = optim.ExponentialMovingAverage(
                self.model.trainable_variables, config.ema_decay
            )
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.loss_sum = tf.Variable(
                0.0,
                trainable=False,
                name="loss_sum",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
            self.data_rng = tf.random.Generator.from_seed(config.seed)
        self.checkpoint = tf.train.Checkpoint(
            model_variables=list(self.model.variables),  # frozen tensors and RNG states too
            optimizer=self.optimizer,
            ema=self.ema,
            step=self.step,
            data_rng=self.data_rng,
        )
        self.manager = self._checkpoint_manager(checkpoint_dir)
        self.multi_worker = distribute.is_multi_worker(self.strategy)
        # The maximum of numbers over all workers (see `distribute.max_over_workers`).
        self._agree = distribute.max_over_workers(self.strategy)
        self.preempted = False
        self._exported_step = None
        self._eval_step = None

    # --- checkpoints and the record -------------------------------------------------------

    def _checkpoint_manager(self, directory):
        return tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=self.config.max_checkpoints
        )

    def restore(self):
        """Restores the newest checkpoint that can be read (`checkpoints.restore_newest`:
        corrupt ones are set aside, storage errors tried again, then reported); returns its
        path, or None. The chief then makes the state file list the readable checkpoints
        alone; every worker must have restored the same step."""
        directory = self.manager.directory
        restored, candidates = checkpoints.restore_newest(self.checkpoint, directory, self.chief)
        if candidates and restored != self.manager.latest_checkpoint and self.chief:
            checkpoints.rewrite_checkpoint_state(directory, restored)
            self.manager = self._checkpoint_manager(directory)
        if self.multi_worker:
            self._check_same_step()
        if restored:
            skipped = candidates.index(restored)
            logger.info(
                "Resumed from %s at step %d%s.",
                restored,
                int(self.step.numpy()),
                f" (the {skipped} newer could not be read)" if skipped else "",
            )
        elif candidates:
            logger.warning("No checkpoint in %s could be read: starting from scratch.", directory)
        return restored

    def _resume(self):
        """Restores the newest readable checkpoint (`restore`), then writes config.json: a
        run that cannot go on (a checkpoint of another model, storage errors) leaves the
        record as it was, and a resumed run keeps the `weights` it started from (a resume
        needs none; the release decides the normalization of the run's exports)."""
        restored = self.restore()
        if restored and self._previous and "weights" in self._previous:
            self._origin = self._previous["weights"]
        if self.chief:
            record = self._record()
            if self._previous and RECORD_KEY in self._previous:  # the weights written so far
                record[RECORD_KEY] = self._previous[RECORD_KEY]
            self._write_record(record)
        return restored

    def _record(self):
        record = json.loads(self.config.to_json())
        record["weights"] = self._origin
        return record

    def _write_record(self, record):
        path = os.path.join(self.config.model_dir, "config.json")
        with self._writing(path, "it is as it was"):
            checkpoints.write_json(path, record, sort_keys=True)

    def _check_same_step(self):
        """Every worker must have restored the same checkpoint: TF does not re-synchronize
        the variables after a restore, so workers that differ would diverge, then hang."""
        step = float(self.step.numpy())
        low, high = self._agree([-step, step])
        if -low != high:
            raise TrainingError(
                f"The workers restored different checkpoints (steps {int(-low)} to "
                f"{int(high)}): a worker cannot read {self.manager.directory} as the chief "
                f"does. Give every worker the same --model_dir (on storage they all read, "
                f"such as gs://) and start them again."
            )

    def save(self):
        """Saves a checkpoint (every worker must call it: a save is collective). The chief's
        goes to --model_dir; another worker's to its scratch folder, deleted right after."""
        number = int(self.step.numpy())
        if self.chief:
            prefix = os.path.join(self.manager.directory, f"ckpt-{number}")
            note = f"the partial {os.path.basename(prefix)} was removed"
            with (
                self._writing(f"the checkpoint {prefix}", note),
                checkpoints.no_partial_checkpoint(prefix),
            ):
                path = self.manager.save(checkpoint_number=number)
            logger.info("Saved checkpoint %s.", path)
            return path
        scratch = os.path.join(self.dir, "checkpoints")
        try:
            with self._writing(f"this worker's copy of the checkpoint, in {scratch}"):
                tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(number)
        finally:
            checkpoints.remove_quietly(scratch)
        return None

    def _writing(self, what, note=None):
        """A full disk while writing `what` becomes a TrainingError (`checkpoints.writing`)."""
        return checkpoints.writing(what, self.manager, self.config.model_dir, note)

    # --- steps ----------------------------------------------------------------------------

    def _build_train_loop(self):
        model, optimizer, strategy, config = self.model, self.optimizer, self.strategy, self.config
        global_batch = float(config.batch_size)
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        @tf.function(jit_compile=config.jit_compile)
        def gradients(images, targets):
            with tf.GradientTape() as tape:
                logits = tf.cast(model(images, training=True), tf.float32)
                per_example = keras.losses.categorical_crossentropy(
                    targets, logits, from_logits=True
                )
                loss = tf.reduce_sum(per_example) / global_batch
                scaled_loss = optimizer.scale_loss(loss) if scaled else loss
            grads = tape.gradient(scaled_loss, model.trainable_variables)
            return grads, loss

        def replica_step(images, targets):
            grads, loss = gradients(images, targets)
            if config.grad_clip:
                context = tf.distribute.get_replica_context()
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                grads, _ = tf.clip_by_global_norm(grads, config.grad_clip)
                # The optimizer sums the gradients over replicas again: hand it a share each.
                grads = [g / strategy.num_replicas_in_sync for g in grads]
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            self.ema.update(self.step)
            self.step.assign_add(1)
            self.loss_sum.assign_add(loss)

        @tf.function
        def train_loop(iterator, steps):
            for _ in tf.range(steps):
                strategy.run(replica_step, args=next(iterator))

        return train_loop

    # --- data -----------------------------------------------------------------------------

    def _train_iterator(self):
        config = self.config
        seed = int(self.data_rng.uniform_full_int((), dtype=tf.int64).numpy() % (2**31))

        def dataset_fn(context):
            return data_lib.train_dataset(
                self.train_source,
                context.get_per_replica_batch_size(config.batch_size),
                config.image_size,
                config.num_classes,
                config.aug,
                label_offset=config.label_offset,
                input_context=context,
                seed=seed,
                deterministic=config.deterministic_data,
                skip_bad_records=self._skip("train"),
                # bfloat16 runs take bfloat16 images: half the bytes to the device.
                image_dtype=tf.bfloat16 if config.mixed_precision == "bfloat16" else tf.float32,
            )

        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def _eval_dataset(self):
        config = self.config

        def dataset_fn(context):
            batch_size = context.get_per_replica_batch_size(self.eval_batch_size)
            # Every input pipeline (host) gives the same number of batches, a multiple of the
            # replicas it feeds: with static shapes (TPU) a host that ran out first would end
            # the pass early on the others, or hang them.
            return data_lib.eval_dataset(
                self.eval_source,
                batch_size,
                config.image_size,
                config.num_classes,
                crop_pct=config.crop_pct,
                label_offset=config.label_offset,
                input_context=context,
                skip_bad_records=self._skip("validation"),
                num_batches=data_lib.eval_batches(
                    self.shards.get("validation")
                    or getattr(self.eval_source, "shard_lengths", None)  # TFDS
                    or self.eval_examples,
                    context.num_input_pipelines,
                    batch_size,
                    context.num_replicas_in_sync // context.num_input_pipelines,
                ),
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _skip(self, split):
        """The shard counts when --skip_bad_records (see `data.train_dataset`), else None."""
        return self.shards.get(split) if self.config.skip_bad_records else None

    def _input_error(self, error, split):
        """The TrainingError for an error of the input pipeline (`DATA_ERRORS`): a shard that
        cannot be opened any more, or bad data (`errors.input_pipeline_error`)."""
        shards = self.shards.get(split)
        return input_pipeline_error(error, split, shards, self.manager.latest_checkpoint)

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, ema=False, stop=None):
        """top1, top5, loss over the validation set (of the EMA weights with `ema=True`).

        The step function is built once per run (the raw and EMA passes share it), and the
        number of examples evaluated is checked against the validation set's. `stop`: see
        `evaluate_model`."""
        if self._eval_step is None:
            self._eval_step = evaluation.make_eval_step(self.model, self.strategy)
        if ema:
            self.ema.swap()
        try:
            results = evaluation.evaluate_model(
                self.model,
                self._eval_dataset(),
                self.strategy,
                step_fn=self._eval_step,
                stop=stop,
            )
        except DATA_ERRORS as error:
            if not is_data_error(error):
                raise
            raise self._input_error(error, "validation") from None
        finally:
            if ema:
                self.ema.swap()
        evaluation.check_count(
            results["examples"], self.eval_examples, self.config.skip_bad_records
        )
        return results

    def evaluate_both(self, stop=None):
        raw, averaged = self.evaluate(stop=stop), self.evaluate(ema=True, stop=stop)
        results = dict(raw, step=int(self.step.numpy()))
        results.update({f"ema_{k}": v for k, v in averaged.items() if k != "examples"})
        return results

    # --- the loop -------------------------------------------------------------------------

    def run(self):
        """Trains and/or evaluates as `--mode` says; returns the evaluation results."""
        config = self.config
        results = None
        if config.mode != "eval":
            results = self.train()
        elif not self._resume() and not config.weights:
            raise TrainingError(
                f"--mode=eval found no checkpoint in {self.manager.directory} and no --weights; "
                f"train first, or pass --weights."
            )
        if config.mode != "train" and results is None:
            results = self.evaluate_both()
            with self._writing(f"the TensorBoard summaries in {self.dir}"):
                writer = tf.summary.create_file_writer(os.path.join(self.dir, "eval"))
            self._log_eval(writer, results)
        if self._exported_step != int(self.step.numpy()):
            self.export_weights(results)
        self.write_results(results)
        return results

    def train(self):
        config = self.config
        self._resume()
        train_loop = self._build_train_loop()
        iterator = self._train_iterator()
        with self._writing(f"the TensorBoard summaries in {self.dir}"):
            writer = tf.summary.create_file_writer(os.path.join(self.dir, "train"))
            eval_writer = tf.summary.create_file_writer(os.path.join(self.dir, "eval"))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        step = int(self.step.numpy())
        start_step, start_time = step, time.time()
        every_minutes, every_steps = checkpoint_interval(config.checkpoint_every)
        saved_step, saved_time = step, time.time()
        results = None
        try:
            while step < self.total_steps:
                epoch_end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
                steps = min(config.steps_per_loop, epoch_end - step)
                tick = time.time()
                try:
                    train_loop(iterator, tf.constant(steps))
                except DATA_ERRORS as error:
                    if not is_data_error(error):
                        raise
                    raise self._input_error(error, "train") from None
                loss = float(self.loss_sum.read_value().numpy()) / steps
                self.loss_sum.assign(0.0)
                step = int(self.step.numpy())
                if not math.isfinite(loss):
                    latest = self.manager.latest_checkpoint
                    kept = (
                        f"the last good checkpoint, {latest}, is kept"
                        if latest
                        else "no checkpoint had been saved yet"
                    )
                    raise TrainingError(
                        f"The loss is {loss} at step {step}: training diverged. Stopped without "
                        f"saving; {kept}. Lower --learning_rate, set --grad_clip, or use "
                        f"--mixed_precision=bfloat16."
                    )
                self._log(writer, step, steps, loss, time.time() - tick, start_step, start_time)
                due = (every_steps is not None and step - saved_step >= every_steps) or (
                    every_minutes is not None and time.time() - saved_time >= every_minutes * 60
                )
                # One all-reduce: a SIGTERM to any worker stops them all, and they all save
                # at the same step (a worker's clock alone must not start a collective save).
                preempted, due = self._agree([self.preempted, due])
                if preempted:
                    self._save_when_preempted(step)
                    raise Preempted(step)
                if step % self.steps_per_epoch == 0 or due:
                    self.save()
                    saved_step, saved_time = step, time.time()
                if step % self.steps_per_epoch == 0:
                    epoch = step // self.steps_per_epoch
                    if config.mode == "train_and_eval" and (
                        epoch % config.eval_every_epochs == 0 or step >= self.total_steps
                    ):
                        # A SIGTERM is acted on between evaluation batches, and after the
                        # export: the checkpoint of this step is saved (just above).
                        try:
                            results = self.evaluate_both(stop=self._preempted_now)
                        except evaluation.EvaluationStopped:
                            raise Preempted(step) from None
                        self._log_eval(eval_writer, results)
                        self.export_weights(results)
                        if self._preempted_now():
                            raise Preempted(step)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return results

    def _save_when_preempted(self, step):
        """The save after SIGTERM. A peer or the storage may already be gone: a failed save
        is reported, and the last good checkpoint (which a failed save never replaces) kept."""
        try:
            self.save()
        except (
            tf.errors.UnavailableError,
            tf.errors.DeadlineExceededError,
            tf.errors.CancelledError,
            tf.errors.AbortedError,
        ) as error:
            latest = self.manager.latest_checkpoint
            logger.error(
                "SIGTERM: the checkpoint at step %d could not be saved (%s: %s); the last good "
                "one, %s, is kept: the run resumes from there.",
                step,
                type(error).__name__,
                first_line(error),
                latest or "none yet",
            )

    def _preempted_now(self):
        """Whether a SIGTERM reached any worker (an all-reduce: every worker calls it at the
        same points)."""
        return self._agree([self.preempted])[0] > 0

    def _on_sigterm(self, signum, frame):
        logger.warning(
            "SIGTERM: saving a checkpoint after the current steps (or evaluation batch), then "
            "stopping."
        )
        self.preempted = True

    # --- logs and weights -----------------------------------------------------------------

    def _log(self, writer, step, steps, loss, seconds, start_step, start_time):
        images_per_second = steps * self.config.batch_size / max(seconds, 1e-9)
        lr = float(self.schedule(step))
        done = step - start_step
        eta = (time.time() - start_time) / max(done, 1) * (self.total_steps - step)
        epoch = step / self.steps_per_epoch
        logger.info(
            "step %d/%d (epoch %.2f) loss %.4f lr %.3g %.1f images/s ETA %s",
            step,
            self.total_steps,
            epoch,
            loss,
            lr,
            images_per_second,
            _duration(eta),
        )
        if self.chief:
            with self._writing(f"the TensorBoard summaries in {self.dir}"):
                self._write_scalars(writer, step, loss, lr, images_per_second)

    @staticmethod
    def _write_scalars(writer, step, loss, lr, images_per_second):
        with writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("images_per_second", images_per_second)

    def _log_eval(self, writer, results):
        logger.info(
            "eval at step %d: top1 %.4f top5 %.4f loss %.4f | EMA top1 %.4f top5 %.4f loss %.4f",
            results["step"],
            results["top1"],
            results["top5"],
            results["loss"],
            results["ema_top1"],
            results["ema_top5"],
            results["ema_loss"],
        )
        if self.chief:
            with self._writing(f"the TensorBoard summaries in {self.dir}"):
                with writer.as_default(step=results["step"]):
                    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
                        tf.summary.scalar(key, results[key])

    def write_results(self, results):
        if self.chief and results is not None:
            path = os.path.join(self.config.model_dir, "eval_results.json")
            with self._writing(path, "it is as it was"):
                checkpoints.write_json(path, results)
            logger.info("Wrote %s.", path)

    def export_weights(self, results=None):
        """Writes the raw and the EMA weights as `.weights.h5` files in --model_dir, and in
        config.json which scored better (the chief only; overwritten at each evaluation).

        `keras_t2t`'s builders, `savedmodels/export.py --weights` and
        `training/evaluate_imagenet.py --weights` take the model_dir itself.
        """
        step = int(self.step.numpy())
        self._exported_step = step
        if not self.chief:
            return
        folder = self.config.model_dir
        # Each file is written whole or not at all: config.json never names a partial one.
        with self._writing(f"the weights in {folder}", "the weights files are as they were"):
            save = self.model.save_weights
            checkpoints.write_whole(os.path.join(folder, RUN_WEIGHTS["raw"]), save)
            self.ema.swap()
            try:
                checkpoints.write_whole(os.path.join(folder, RUN_WEIGHTS["ema"]), save)
            finally:
                self.ema.swap()
        record = self._record()
        record[RECORD_KEY] = dict(RUN_WEIGHTS, step=step, best=None)
        if results:
            best = "ema" if results["ema_top1"] > results["top1"] else "raw"
            record[RECORD_KEY].update(best=best, top1=results["top1"], ema_top1=results["ema_top1"])
        self._write_record(record)
        logger.info(
            "Wrote the raw and EMA weights to %s (%s).",
            folder,
            f"the {record[RECORD_KEY]['best']} weights scored better"
            if results
            else "not evaluated",
        )


# --- helpers --------------------------------------------------------------------------------


def _check_tensorboard():
    """The summaries need tensorboard (the `train` extra): say so now, not at the first log."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise TrainingError(
            "Training writes TensorBoard summaries and needs the tensorboard package: "
            "pip install keras-t2t[train] (or pip install tensorboard)."
        ) from None


def _duration(seconds):
    """`seconds` as h:mm:ss."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
