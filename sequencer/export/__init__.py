"""Export of the committed event stream to a distributed log (NATS JetStream), exactly once.

    from sequencer.export import JetStreamExporter
    from sequencer.projection import JournalSource

    exporter = JetStreamExporter(["nats://127.0.0.1:4222"], stream="LEDGER",
                                 subject_prefix="seqd.ledger", log_id="n1")
    exporter.run(JournalSource(Ledger, journal_dir, follow=True), until_caught_up=False)

The events come from the projector's sources (`sequencer.projection`): the journal applied
in-process, or the node's catch-up subscription. docs/integration.md has the long form.

    message.py    message ids, headers, subjects and the resume rule (I/O-free)
    jetstream.py  the exporter: sessions, async publishes and their acks (needs nats-py:
                  pip install 'seqd[export]')
"""

from sequencer.export.jetstream import (
    ACK_TIMEOUT_S_DEFAULT,
    BATCH_EVENTS_DEFAULT,
    DUPLICATE_WINDOW_S_DEFAULT,
    DUPLICATE_WINDOW_S_MIN,
    IN_FLIGHT_DEFAULT,
    IN_FLIGHT_MAX,
    NATS_MISSING,
    JetStreamExporter,
    sequence_of_index,
)
from sequencer.export.message import (
    HEADER_INDEX,
    HEADER_LOG,
    HEADER_MSG_ID,
    HEADER_ORDINAL,
    HEADER_TIMESTAMP_NS,
    HEADER_TYPE,
    ExportError,
    ExportMessage,
    encode_message,
    event_type_name,
    message_id,
    resume_position,
)

__all__ = [
    "ACK_TIMEOUT_S_DEFAULT",
    "BATCH_EVENTS_DEFAULT",
    "DUPLICATE_WINDOW_S_DEFAULT",
    "DUPLICATE_WINDOW_S_MIN",
    "HEADER_INDEX",
    "HEADER_LOG",
    "HEADER_MSG_ID",
    "HEADER_ORDINAL",
    "HEADER_TIMESTAMP_NS",
    "HEADER_TYPE",
    "IN_FLIGHT_DEFAULT",
    "IN_FLIGHT_MAX",
    "NATS_MISSING",
    "ExportError",
    "ExportMessage",
    "JetStreamExporter",
    "encode_message",
    "event_type_name",
    "message_id",
    "resume_position",
    "sequence_of_index",
]
