"""The hand-written TensorBoard event files, read back by TensorBoard's own loader."""

import math

from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from playpen_jax import events


def test_crc32c_check_value_and_record_frame():
    assert events.crc32c(b"123456789") == 0xE3069283   # the CRC-32C catalogue's check value
    assert events.crc32c(b"") == 0
    record = events.frame(b"abc")
    assert len(record) == 8 + 4 + 3 + 4 and record[12:15] == b"abc"


def test_events_read_back_with_tensorboards_loader(tmp_path):
    w = events.EventFileWriter(str(tmp_path), filename_suffix=".x", purge_step=7)
    w.add_scalars(7, [("train/loss", 0.25), ("eval/clem score (all)", float("nan"))])
    w.add_scalars(2 ** 40, [("/lead/big", -3.5)])
    w.add_text(8, "config", "lr: **1e-5** é")
    w.close()
    assert w.path.endswith(".x") and "events.out.tfevents." in w.path
    got = list(LegacyEventFileLoader(w.path).Load())   # the events as written
    assert got[0].file_version == "brain.Event:2" and got[0].step == 7
    assert got[1].step == 7 and got[1].session_log.status == 1   # START: hides steps >= 7 before it
    loss, clem, big, text = got[2:]

    def scalar(e):
        return e.step, e.summary.value[0].tag, e.summary.value[0].simple_value

    assert scalar(loss) == (7, "train/loss", 0.25) and scalar(big) == (2 ** 40, "lead/big", -3.5)
    assert clem.summary.value[0].tag == "eval/clem_score__all_" and math.isnan(scalar(clem)[2])
    value = text.summary.value[0]
    assert value.tag == "config/text_summary" and value.metadata.plugin_data.plugin_name == "text"
    assert value.tensor.dtype == 7 and [d.size for d in value.tensor.tensor_shape.dim] == [1]
    assert value.tensor.string_val == ["lr: **1e-5** é".encode()]
    assert all(abs(e.wall_time - got[0].wall_time) < 60 for e in got)
