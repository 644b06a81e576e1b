-- citygate hub schema, version 2: the hub's own events (an emergency's destruction), and an
-- index that finds an emergency's records.

-- What the hub did to the data, for the audit trail: `emergency_destroyed` with the
-- emergency's id and how many data records were removed.
CREATE TABLE hub_events (
    id           bigserial    PRIMARY KEY,
    event        text         NOT NULL,
    emergency_id text,
    records      bigint,
    at           timestamptz  NOT NULL DEFAULT now()
);

-- Only records collected under an emergency carry emergency_id: a small partial index.
CREATE INDEX records_emergency ON records (emergency_id) WHERE emergency_id IS NOT NULL;
