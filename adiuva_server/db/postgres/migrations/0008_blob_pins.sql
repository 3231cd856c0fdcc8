-- Objects being stored by some node and not yet referenced by a committed row (storage/pins.py).
-- A node deleting an unreferenced object holds the object's advisory lock while it checks these
-- rows and deletes; a node storing the object takes the same lock to add its pin, so it either
-- pins first (the deleter sees the pin and keeps the object) or waits for the deletion to end
-- (and then stores the object again). A pin past `expires_at` belongs to a node that died.
CREATE TABLE blob_pins (
    digest     text NOT NULL,
    pin_id     text NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (digest, pin_id)
);
CREATE INDEX blob_pins_expiry ON blob_pins (expires_at);
