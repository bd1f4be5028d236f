-- dripd 0005: one address, one spelling. dripd now stores and matches an email address
-- as its bare address in Unicode NFC (dripd.addresses), so rewrite the email suppressions
-- stored before: a display name is dropped (a one-click unsubscribe stored
-- "bob <bob@example.com>", which no send matched) and the text is NFC, so a decomposed
-- "jose\u0301@…" meets "josé@…". They were already trimmed and lowercased. Where two
-- spellings meet, the earliest suppression stays. A domain stored as xn-- punycode is
-- left as it is: SQL cannot decode it (suppress its Unicode form again). normalize() needs
-- a UTF8 database; on any other encoding nothing is rewritten. Forward-only; never edit
-- once released.
DO $$
BEGIN
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RETURN;
    END IF;
    CREATE TEMP TABLE respelled ON COMMIT DROP AS
    SELECT id, address, spelled,
           row_number() OVER (PARTITION BY tenant_key, spelled ORDER BY created_at, id) AS n
    FROM (
        SELECT id, tenant_key, address, created_at,
               normalize(regexp_replace(
                   coalesce(substring(address FROM '<([^<>]*)>\s*$'), address),
                   '^\s+|\s+$', '', 'g'), NFC) AS spelled
        FROM dripd.suppressions
        WHERE channel = 'email'
    ) AS s;
    DELETE FROM dripd.suppressions AS d USING respelled AS r WHERE d.id = r.id AND r.n > 1;
    UPDATE dripd.suppressions AS u SET address = r.spelled
    FROM respelled AS r
    WHERE u.id = r.id AND r.n = 1 AND r.spelled <> r.address AND r.spelled <> '';
END
$$;
