-- The sidecar's database, at the schema version recorded in PRAGMA user_version.
--
-- The program applies this file to a new database and upgrades an older one in
-- place with the migrations in sidecar/migrations.py. All times are UTC: columns
-- ending in _at or _end are seconds, versions are milliseconds.

-- Every delivery the sidecar acknowledged, applied or not. The parsed facts are
-- kept beside the body so that `replay` can rebuild the entitlement table after
-- the body itself has been dropped at the end of the retention period.
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id      TEXT PRIMARY KEY,    -- webhook-id header, else sha256 of the body
    received_at      INTEGER NOT NULL,
    source           TEXT NOT NULL,       -- 'webhook', 'replay', 'import', ...
    event_type       TEXT NOT NULL,       -- canonical name, or the name as sent
    kind             TEXT NOT NULL,       -- 'subscription', 'customer' or 'ignored'
    result           TEXT NOT NULL,       -- 'applied', 'stale' or 'ignored'
    shop_id          TEXT,
    product          TEXT,
    version          INTEGER,             -- ordering key, milliseconds
    plan             TEXT,
    status           TEXT,
    trial_end        INTEGER,
    current_term_end INTEGER,
    updated_at       INTEGER,
    customer_deleted INTEGER,             -- customer events only: 0 or 1
    body             BLOB                 -- NULL once older than the retention period
);
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (received_at);
CREATE INDEX IF NOT EXISTS deliveries_by_shop ON deliveries (shop_id, received_at);

-- One row per (shop, product): the newest subscription state seen. No personal
-- data lives here.
CREATE TABLE IF NOT EXISTS entitlements (
    shop_id          TEXT NOT NULL,
    product          TEXT NOT NULL,
    plan             TEXT,
    status           TEXT NOT NULL,
    trial_end        INTEGER,
    current_term_end INTEGER,
    updated_at       INTEGER,             -- the subscription's own timestamp
    version          INTEGER NOT NULL,
    delivery_id      TEXT NOT NULL,       -- the delivery that wrote this state
    -- A copy of customers.deleted for this shop, kept by the triggers below:
    -- write customers, never this column.
    customer_deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (shop_id, product)
) WITHOUT ROWID;

-- Customer state, which applies to every product of a shop and is versioned on
-- its own.
CREATE TABLE IF NOT EXISTS customers (
    shop_id     TEXT PRIMARY KEY,
    deleted     INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    delivery_id TEXT NOT NULL
) WITHOUT ROWID;

-- A lookup reads one row of entitlements and no other table: with a million
-- shops, reading the customer's row as well makes each lookup that finds no
-- kept answer a fifth slower. These triggers keep entitlements.customer_deleted
-- equal to the shop's customers.deleted (0 without a row) whatever writes
-- either table: the sidecar, `replay`, `import`, or an operator in sqlite3.
CREATE TRIGGER IF NOT EXISTS entitlement_copies_customer_deleted
AFTER INSERT ON entitlements
WHEN NEW.customer_deleted IS NOT
    coalesce((SELECT deleted FROM customers WHERE shop_id = NEW.shop_id), 0)
BEGIN
    UPDATE entitlements
    SET customer_deleted =
        coalesce((SELECT deleted FROM customers WHERE shop_id = NEW.shop_id), 0)
    WHERE shop_id = NEW.shop_id AND product = NEW.product;
END;

CREATE TRIGGER IF NOT EXISTS customer_inserted_copies_deleted
AFTER INSERT ON customers
BEGIN
    UPDATE entitlements SET customer_deleted = NEW.deleted
    WHERE shop_id = NEW.shop_id AND customer_deleted IS NOT NEW.deleted;
END;

CREATE TRIGGER IF NOT EXISTS customer_updated_copies_deleted
AFTER UPDATE ON customers
BEGIN
    UPDATE entitlements SET customer_deleted = 0
    WHERE shop_id = OLD.shop_id AND OLD.shop_id IS NOT NEW.shop_id
        AND customer_deleted IS NOT 0;
    UPDATE entitlements SET customer_deleted = NEW.deleted
    WHERE shop_id = NEW.shop_id AND customer_deleted IS NOT NEW.deleted;
END;

CREATE TRIGGER IF NOT EXISTS customer_removed_clears_deleted
AFTER DELETE ON customers
BEGIN
    UPDATE entitlements SET customer_deleted = 0
    WHERE shop_id = OLD.shop_id AND customer_deleted IS NOT 0;
END;

-- Every change to entitlements, whoever makes it, so that a process holding a
-- copy of the table in memory (the server, for lookups) can bring just the
-- changed rows up to date. `seq` only grows (AUTOINCREMENT), even once old
-- entries are deleted: the server deletes those it has applied.
CREATE TABLE IF NOT EXISTS entitlement_changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    shop_id TEXT NOT NULL,
    product TEXT NOT NULL
);

CREATE TRIGGER IF NOT EXISTS entitlement_inserted_logs_change
AFTER INSERT ON entitlements
BEGIN
    INSERT INTO entitlement_changes (shop_id, product)
    VALUES (NEW.shop_id, NEW.product);
END;

CREATE TRIGGER IF NOT EXISTS entitlement_updated_logs_change
AFTER UPDATE ON entitlements
BEGIN
    INSERT INTO entitlement_changes (shop_id, product)
    SELECT OLD.shop_id, OLD.product
    WHERE OLD.shop_id IS NOT NEW.shop_id OR OLD.product IS NOT NEW.product;
    INSERT INTO entitlement_changes (shop_id, product)
    VALUES (NEW.shop_id, NEW.product);
END;

CREATE TRIGGER IF NOT EXISTS entitlement_deleted_logs_change
AFTER DELETE ON entitlements
BEGIN
    INSERT INTO entitlement_changes (shop_id, product)
    VALUES (OLD.shop_id, OLD.product);
END;

-- Bodies that passed authentication but could not be used, kept for the
-- operator with the reason they were refused. A retried delivery updates its row.
CREATE TABLE IF NOT EXISTS quarantine (
    delivery_id   TEXT PRIMARY KEY,
    first_seen_at INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    attempts      INTEGER NOT NULL,
    status        INTEGER NOT NULL,       -- the HTTP status that was answered
    reason        TEXT NOT NULL,
    body          BLOB                    -- NULL once older than the retention period
);

-- Settings of the running server that the view below needs, written at each
-- start: the grace period, so that the view gives the same verdict as lookups.
CREATE TABLE IF NOT EXISTS settings_in_use (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Multi-host mode only: how far this database has applied the shared stream of
-- deliveries on NATS JetStream. Written in the same transaction as the
-- deliveries it covers, so the database and its position never disagree, and a
-- backup carries the position it was taken at.
CREATE TABLE IF NOT EXISTS stream_position (
    stream   TEXT PRIMARY KEY,            -- the JetStream stream's name
    created  TEXT NOT NULL,               -- when that stream was created: a new one restarts at 1
    sequence INTEGER NOT NULL             -- the last stream sequence applied here
) WITHOUT ROWID;

-- Each shop's entitlement as it stands now, with readable dates, for operators
-- working in the sqlite3 shell: "why is this shop denied?" is its `reason`.
-- The rule lives in sidecar/entitlement.py; this is a copy of it in SQL, and a
-- test keeps the two giving the same verdict.
CREATE VIEW IF NOT EXISTS entitlements_readable AS
SELECT
    shop_id,
    product,
    plan,
    status,
    reason IN ('active', 'trial', 'non_renewing') AS entitled,
    reason,
    datetime(trial_end, 'unixepoch') AS trial_end_utc,
    datetime(current_term_end, 'unixepoch') AS current_term_end_utc,
    datetime(CASE
        WHEN reason = 'unreadable' THEN NULL
        WHEN status = 'in_trial' THEN trial_end + grace_s
        WHEN status = 'non_renewing' THEN current_term_end + grace_s
    END, 'unixepoch') AS entitled_until_utc,
    datetime(updated_at, 'unixepoch') AS updated_at_utc,
    customer_deleted,
    delivery_id
FROM (
    SELECT
        e.*,
        g.grace_s,
        CASE
            -- What only a write by hand can store, and a lookup answers 503
            -- for rather than guess what it meant (see storage.py).
            WHEN typeof(e.plan) NOT IN ('text', 'null')
                OR typeof(e.status) <> 'text'
                OR typeof(e.trial_end) IN ('text', 'blob')
                OR typeof(e.current_term_end) IN ('text', 'blob')
                OR typeof(e.updated_at) IN ('text', 'blob')
                THEN 'unreadable'
            WHEN e.customer_deleted THEN 'customer_deleted'
            WHEN e.status = 'active' THEN 'active'
            WHEN e.status = 'in_trial' THEN
                CASE WHEN e.trial_end IS NULL OR g.now_s < e.trial_end + g.grace_s
                    THEN 'trial' ELSE 'trial_ended' END
            WHEN e.status = 'non_renewing' THEN
                CASE WHEN e.current_term_end IS NULL
                        OR g.now_s < e.current_term_end + g.grace_s
                    THEN 'non_renewing' ELSE 'term_ended' END
            WHEN e.status IN ('future', 'paused', 'cancelled') THEN e.status
            ELSE 'unknown_status'
        END AS reason
    FROM entitlements AS e
    CROSS JOIN (
        SELECT
            CAST(strftime('%s', 'now') AS INTEGER) AS now_s,
            coalesce(
                (SELECT CAST(value AS INTEGER) FROM settings_in_use
                 WHERE name = 'grace_seconds'),
                3600
            ) AS grace_s
    ) AS g
);
