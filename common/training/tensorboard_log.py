"""TensorBoard event files, written the same way by both backends.

torch.utils.tensorboard needs torch, and MindSpore's SummaryRecord writes MindInsight's format, not
TensorBoard's. So both backends log through this class, built on the tensorboard package's own pieces
(its record framing and event/summary protos): numpy in, PNGs encoded with PIL, neither torch nor
TensorFlow imported.
"""
from __future__ import annotations

import io
import itertools
import os
import socket
import time
from typing import Dict

import numpy as np
from PIL import Image

from common.errors import UserError

MISSING = "--report_to tensorboard needs the tensorboard package: pip install tensorboard"
_uid = itertools.count()  # two logs opened in one second by one process still get two files


class TensorBoardLog:
    """One event file in `logdir`; `tensorboard --logdir <logdir or a folder above>` shows it.

    Every event is flushed to the file as it is written: TensorBoard sees it at once, and a crash
    loses nothing. Use as a context manager, or call close().
    """

    def __init__(self, logdir: str):
        try:
            # RecordWriter on a plain file, not EventFileWriter: that one goes through
            # tensorboard.compat.tf (tf.io.gfile), which imports TensorFlow whenever it is installed.
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ModuleNotFoundError as e:
            if e.name != "tensorboard" and not (e.name or "").startswith("tensorboard."):
                raise  # tensorboard is there but something it needs is not: its own message says what
            raise UserError(MISSING) from None
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(logdir, exist_ok=True)
        # the name TensorBoard's reader looks for ("tfevents"), as EventFileWriter spells it
        self.path = os.path.join(logdir, "events.out.tfevents.%010d.%s.%s.%s" % (
            time.time(), socket.gethostname(), os.getpid(), next(_uid)))
        self._writer = RecordWriter(open(self.path, "wb"))
        self._write(event_pb2.Event(file_version="brain.Event:2"))

    def _write(self, event) -> None:
        event.wall_time = time.time()
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def _summary(self, step: int, values) -> None:
        self._write(self._event_pb2.Event(step=int(step), summary=self._summary_pb2.Summary(value=values)))

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """{tag: value} at `step`, tags like "train/loss" (TensorBoard stores float32)."""
        Value = self._summary_pb2.Summary.Value
        self._summary(step, [Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])

    def image(self, step: int, tag: str, array: np.ndarray) -> None:
        """An HxWx3 uint8 RGB picture at `step`, stored as PNG."""
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 image, got {array.dtype} {array.shape}")
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
        h, w = array.shape[:2]
        Summary = self._summary_pb2.Summary
        img = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self._summary(step, [Summary.Value(tag=tag, image=img)])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if not self._writer.closed:
            self._writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
