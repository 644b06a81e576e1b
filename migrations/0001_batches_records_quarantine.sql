-- citygate hub schema, version 1: batches, records (partitioned by day on `at`), quarantine.
-- Applied by `citygate hub-migrate` (or at hub start with `[sink] migrate = true`) in one
-- transaction, recorded in schema_migrations.

-- One row per accepted batch. Its key is the batch's identity: a batch whose key is present
-- is a duplicate; the row and the batch's records commit in one transaction.
CREATE TABLE batches (
    gateway          text          NOT NULL,
    stream           text          NOT NULL,
    -- The gateway store's incarnation, 16 lowercase hex digits (as in the JSON Lines sink).
    incarnation      text          NOT NULL,
    seq              numeric(20,0) NOT NULL,
    -- NULL for envelopes before version 3, which did not carry a purpose.
    purpose          text,
    policy_hash      bytea         NOT NULL,
    signer_key_id    bytea         NOT NULL,
    recipient_key_id bytea         NOT NULL,
    created_at       timestamptz   NOT NULL,
    received_at      timestamptz   NOT NULL DEFAULT now(),
    record_count     integer       NOT NULL,
    PRIMARY KEY (gateway, stream, incarnation, seq)
);

-- One row per record. (gateway, stream, incarnation, seq) names its batch.
CREATE TABLE records (
    gateway      text          NOT NULL,
    stream       text          NOT NULL,
    incarnation  text          NOT NULL,
    seq          numeric(20,0) NOT NULL,
    purpose      text,
    -- The keyed pseudonym of the meter (or household), and the key epoch it was made under.
    subject      text          NOT NULL,
    epoch        integer       NOT NULL,
    field        text          NOT NULL,
    -- Exactly one of the three is set: numbers (integers exactly, floats as sent), text, bool.
    value_num    numeric,
    value_text   text,
    value_bool   boolean,
    unit         text          NOT NULL,
    -- A reading's time; an aggregate's window start.
    at           timestamptz   NOT NULL,
    -- good, uncertain:REASON or bad:REASON.
    quality      text          NOT NULL,
    -- Aggregates only: function (sum, mean, min, max, last, delta), [start, end), how many
    -- readings from how many devices, and whether the window is only partly covered.
    window_function text,
    window_start    timestamptz,
    window_end      timestamptz,
    window_samples  integer,
    window_devices  integer,
    window_partial  boolean,
    tags         text[]        NOT NULL,
    -- The ID of an `emergency_id=ID` tag, if any.
    emergency_id text
) PARTITION BY RANGE (at);

-- Daily partitions (records_YYYYMMDD) are created by the hub before it inserts into them;
-- anything outside them lands here, so nothing is refused for its date.
CREATE TABLE records_default PARTITION OF records DEFAULT;

CREATE INDEX records_subject_field_at ON records (subject, field, at);
CREATE INDEX records_batch ON records (gateway, stream, incarnation, seq);

-- Batches the database refused for their data (SQLSTATE classes 22 and 23): recorded with
-- the reason and acknowledged, never retried.
CREATE TABLE quarantine (
    gateway      text          NOT NULL,
    stream       text          NOT NULL,
    incarnation  text          NOT NULL,
    seq          numeric(20,0) NOT NULL,
    purpose      text,
    reason       text          NOT NULL,
    sqlstate     text          NOT NULL,
    received_at  timestamptz   NOT NULL DEFAULT now(),
    record_count integer       NOT NULL,
    PRIMARY KEY (gateway, stream, incarnation, seq)
);
